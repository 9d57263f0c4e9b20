"""Issue 10: edge cases that used to give NaN, hangs or raw errors; each is fast (< 1 s)."""

import warnings

import pytest
import torch
from rebasin_testkit import assert_state_equal, mlp, state_copy
from torch import nn

from avalanche_rebasin import PermutationSpec, Stopping, align, discover_spec, weight_matching
from avalanche_rebasin.alignment.lmc import interpolate, lmc_curve, reestimate_batchnorm
from avalanche_rebasin.core.sinkhorn import sinkhorn


def _mlp_spec(model: nn.Module) -> PermutationSpec:
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    groups = {"h1": [("1.weight", 0), ("1.bias", 0), ("3.weight", 1)]}
    groups["h2"] = [("3.weight", 0), ("3.bias", 0), ("5.weight", 1)]
    return PermutationSpec.from_groups(groups, shapes)


def _pair(width: int = 8) -> tuple[nn.Module, nn.Module, PermutationSpec]:
    torch.manual_seed(0)
    a, b = (
        mlp(2, width=width, in_features=6, out_features=3),
        mlp(2, width=width, in_features=6, out_features=3),
    )
    return a, b, _mlp_spec(a)


def _data(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(n)]


# -- 1-4: Sinkhorn ------------------------------------------------------------------------


@pytest.mark.parametrize("backward", ["implicit", "unrolled"])
def test_sinkhorn_overflowing_logits_give_a_plan_not_nan(backward):
    logits = torch.tensor([[1e38, -1e38, 0.0], [0.0, 1e38, -1e38], [-1e38, 0.0, 1e38]])
    plan = sinkhorn(logits, tau=1e-3, backward=backward)
    assert plan.dtype == torch.float32 and torch.isfinite(plan).all()
    torch.testing.assert_close(plan, torch.eye(3))
    huge = torch.randn(5, 5, generator=torch.Generator().manual_seed(0)) * 1e37
    assert torch.isfinite(sinkhorn(huge, tau=1.0, backward=backward)).all()


def test_sinkhorn_overflow_beyond_float64_is_explained():
    with pytest.raises(ValueError, match=r"overflows.*larger tau or rescale the logits"):
        sinkhorn(torch.full((3, 3), 1e300, dtype=torch.float64), tau=1e-300)


@pytest.mark.parametrize("solver", ["schur", "cg", "full"])
def test_sinkhorn_one_by_one_plan_has_zero_gradient(solver):
    x = torch.randn(1, 1, requires_grad=True)
    plan = sinkhorn(x, linear_solver=solver)
    (plan * 3.0).sum().backward()
    assert torch.equal(plan.detach(), torch.ones(1, 1)) and torch.equal(x.grad, torch.zeros(1, 1))
    batched = torch.randn(2, 1, 1, requires_grad=True)
    sinkhorn(batched, linear_solver=solver).sum().backward()
    assert torch.equal(batched.grad, torch.zeros(2, 1, 1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backward", ["implicit", "unrolled"])
def test_sinkhorn_half_precision_backward_matches_float32(dtype, backward):
    g = torch.Generator().manual_seed(0)
    base, upstream = torch.randn(5, 5, generator=g), torch.randn(5, 5, generator=g)
    x = base.to(dtype).requires_grad_()
    plan = sinkhorn(x, tau=0.5, backward=backward)
    (plan * upstream.to(dtype)).sum().backward()
    ref = base.to(dtype).float().requires_grad_()
    (sinkhorn(ref, tau=0.5) * upstream.to(dtype).float()).sum().backward()
    assert plan.dtype == dtype and x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.float(), ref.grad, atol=2e-2, rtol=2e-2)


def test_sinkhorn_extreme_logits_backward_is_finite():
    x = (torch.randn(8, 8, generator=torch.Generator().manual_seed(0)) * 1e34).requires_grad_()
    (sinkhorn(x, tau=1e-5) * torch.randn(8, 8)).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_sinkhorn_backward_survives_failing_lapack(monkeypatch):
    g = torch.Generator().manual_seed(0)
    base, upstream = (
        torch.randn(6, 6, generator=g, dtype=torch.float64),
        torch.randn(6, 6, dtype=torch.float64),
    )
    ref = base.clone().requires_grad_()
    (sinkhorn(ref, n_iter=200) * upstream).sum().backward()

    def no_cholesky(matrix):
        return matrix, torch.ones(matrix.shape[:-2], dtype=torch.int32)

    def no_eigh(matrix):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "cholesky_ex", no_cholesky)
    monkeypatch.setattr(torch.linalg, "eigh", no_eigh)
    x = base.clone().requires_grad_()
    (sinkhorn(x, n_iter=200) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, atol=1e-6, rtol=1e-6)


def test_sinkhorn_nan_upstream_gradient_propagates_without_error():
    x = torch.randn(2, 4, 4, requires_grad=True)
    upstream = torch.ones(2, 4, 4)
    upstream[0, 0, 0] = float("nan")
    (sinkhorn(x) * upstream).sum().backward()
    assert torch.isnan(x.grad[0]).any() and torch.isfinite(x.grad[1]).all()


# -- 5: nothing to permute --------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: nn.Sequential(nn.ReLU()), lambda: nn.BatchNorm1d(6, affine=False)])
def test_models_without_parameters_give_identity_and_bn_reestimation_works(make):
    a, b = make(), make()
    empty = PermutationSpec({}, {})
    result = align(a, b, spec=empty, progress=False)
    assert result.permutations == {} and result.steps == 0 and result.model is not b
    assert result.converged and result.marginal_error is None  # the identity is the only choice
    assert weight_matching(a, b, spec=empty) == {}
    x = torch.randn(8, 6) * 3 + 1
    reestimate_batchnorm(a, [x])
    if isinstance(a, nn.BatchNorm1d):
        torch.testing.assert_close(a.running_mean, x.mean(0))
    assert lmc_curve(a, b, lambda m: 0.0, n_points=3, bn_data=[x]).values == [0.0, 0.0, 0.0]


# -- 6: callable costs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cost", "error", "message"),
    [
        (lambda a, b, batch: (b["1.weight"] - a["1.weight"]) ** 2, ValueError, r"shape \(8, 6\).*scalar"),
        (lambda a, b, batch: 1.0, TypeError, r"returned float.*scalar torch\.Tensor"),
        (lambda a, b, batch: torch.tensor(3.0), ValueError, "does not depend on the permuted state"),
        (lambda a, b, batch: b["1.weight"].detach().sum(), ValueError, "does not depend on the permuted"),
    ],
)
def test_bad_callable_cost_is_named(cost, error, message):
    a, b, spec = _pair()
    with pytest.raises(error, match=rf"cost <lambda>.*{message}"):
        align(a, b, spec=spec, cost=cost, data=_data(), progress=False, stopping=Stopping(max_steps=3))


# -- 7: data for the data costs ------------------------------------------------------------------


@pytest.mark.parametrize("data", [[], (), iter([])])
def test_empty_data_is_refused_up_front(data):
    a, b, spec = _pair()
    with pytest.raises(ValueError, match=r"data (is empty|yielded no batches).*at least one"):
        align(a, b, spec=spec, cost="mid", data=data, progress=False, stopping=Stopping(max_steps=5))


@pytest.mark.parametrize("cost", ["mid", "rnd"])
def test_one_shot_data_shorter_than_steps_stops_cleanly(cost):
    a, b, spec = _pair()
    with pytest.warns(UserWarning, match="data ran out after 2 of 50 steps"):
        result = align(
            a, b, spec=spec, cost=cost, data=iter(_data(2)), progress=False, stopping=Stopping(max_steps=50)
        )
    assert result.steps == 2 and result.data_exhausted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cycled = align(
            a, b, spec=spec, cost=cost, data=_data(2), progress=False, stopping=Stopping(max_steps=5)
        )
    assert cycled.steps == 5 and not cycled.data_exhausted


# -- 8, 9: interpolation and the LMC curve ------------------------------------------------------------


def test_interpolating_different_widths_names_the_tensor():
    with pytest.raises(
        ValueError, match=r"'1\.weight' has shape \(8, 6\) in model_a and \(12, 6\) in model_b"
    ):
        interpolate(mlp(2, width=8, in_features=6), mlp(2, width=12, in_features=6), 0.5)
    with pytest.raises(ValueError, match="different architectures"):
        lmc_curve(mlp(2, width=8), mlp(2, width=12), lambda m: 0.0, n_points=2)


def test_lmc_curve_of_bn_model_against_itself_is_flat_with_a_generator():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    data = _data(3)

    def loss(m: nn.Module) -> float:
        with torch.no_grad():
            return float(sum(nn.functional.cross_entropy(m(x), y) for x, y in data))

    curve = lmc_curve(model, model, loss, n_points=3, bn_data=(x for x, _ in data))
    assert curve.values[0] == curve.values[1] == curve.values[2]
    with pytest.raises(ValueError, match="bn_data yielded no batches"):
        lmc_curve(model, model, loss, n_points=3, bn_data=iter([]))


# -- 10: inputs stay bit-identical, even for a model that mutates itself in forward ---------------


class SelfMutating(nn.Module):
    """Counts its calls in a buffer; ``Embedding(max_norm=1)`` renormalises its weight when called."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6, max_norm=1.0)
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fc2(torch.relu(self.fc1(self.emb(x))))


def test_entry_points_leave_self_mutating_models_bit_identical():
    torch.manual_seed(0)
    a, b = SelfMutating(), SelfMutating()
    data = [(torch.randint(0, 10, (5,)), torch.randint(0, 3, (5,))) for _ in range(2)]
    before_a, before_b = state_copy(a), state_copy(b)
    spec = discover_spec(a, data[0][0])  # discovery must not run the model itself
    assert_state_equal(a, before_a)
    assert spec.axes["emb.weight"][1] is not None and spec.axes["fc1.weight"][0] is not None
    align(a, b, spec=spec, progress=False, stopping=Stopping(max_steps=2))
    align(a, b, spec=spec, cost="mid", data=data, progress=False, stopping=Stopping(max_steps=2))
    weight_matching(a, b, spec=spec)
    interpolate(a, b, 0.5)(data[0][0])
    lmc_curve(
        a, b, lambda m: float(m(data[0][0]).detach().sum()), n_points=3, bn_data=iter(x for x, _ in data)
    )
    assert_state_equal(a, before_a)
    assert_state_equal(b, before_b)

import pytest
import torch

from avalanche_rebasin import Sinkhorn, Stopping, discover_spec, hard_permutation
from avalanche_rebasin.core.sinkhorn import marginal_error, permutation_matrix, sinkhorn


def _logits(n: int, batch: tuple[int, ...] = (), seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.eye(n, dtype=dtype) + 0.5 * torch.randn(*batch, n, n, generator=g, dtype=dtype)


def test_plan_is_doubly_stochastic():
    plan = sinkhorn(_logits(7, (3,)), tau=0.7, n_iter=200)
    assert plan.shape == (3, 7, 7)
    assert marginal_error(plan) < 1e-10
    assert (plan >= 0).all()


@pytest.mark.parametrize("solver", ["auto", "schur", "cg", "full"])
def test_implicit_backward_matches_unrolled_float64(solver):
    x = _logits(6, (2,)).requires_grad_()
    upstream = torch.randn(2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (sinkhorn(x, 0.7, 1000, linear_solver=solver) * upstream).sum().backward()
    implicit = x.grad.clone()
    x.grad = None
    (sinkhorn(x, 0.7, 1000, backward="unrolled") * upstream).sum().backward()
    unrolled = x.grad
    assert unrolled.abs().max() > 1e-3  # a non-trivial gradient
    torch.testing.assert_close(implicit, unrolled, atol=1e-9, rtol=1e-7)


def test_implicit_backward_passes_gradcheck_when_converged():
    x = _logits(5).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: sinkhorn(t, 0.8, 1000), (x,), atol=1e-6)


def test_float32_sum_backward_and_batches():
    x = _logits(40, (3,), dtype=torch.float32).requires_grad_()
    sinkhorn(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    y = _logits(40, (3,), dtype=torch.float32).requires_grad_()
    sinkhorn(y).pow(2).sum().backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().max() > 0


def test_backward_leaves_upstream_gradient_untouched():
    x = _logits(5).requires_grad_()
    plan = sinkhorn(x, 1.0, 50)
    upstream = torch.randn(5, 5, dtype=torch.float64)
    before = upstream.clone()
    plan.backward(upstream)
    assert torch.equal(upstream, before)


@pytest.mark.parametrize("solver", ["auto", "schur", "cg", "full"])
def test_saturated_plan_does_not_crash(solver):
    x = (100.0 * torch.eye(6)).requires_grad_()
    plan = sinkhorn(x, tau=0.01, n_iter=20, linear_solver=solver)
    assert torch.allclose(plan, torch.eye(6))
    (plan * torch.randn(6, 6)).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_invalid_temperature_and_logits_raise():
    x = _logits(4)
    for tau in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tau"):
            sinkhorn(x, tau=tau)
    with pytest.raises(ValueError, match="tau"):
        Sinkhorn(tau=0)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sinkhorn(bad)
    with pytest.raises(ValueError, match="square"):
        sinkhorn(torch.zeros(3, 4))


def test_hard_permutation_recovers_index_and_matrix_convention():
    g = torch.Generator().manual_seed(3)
    idx = torch.randperm(9, generator=g)
    logits = permutation_matrix(idx, torch.float64) * 5 + 0.1 * torch.randn(
        9, 9, generator=g, dtype=torch.float64
    )
    assert torch.equal(hard_permutation(logits), idx)
    x = torch.randn(9, 4, generator=g)
    assert torch.equal(permutation_matrix(idx) @ x, x[idx])
    batched = hard_permutation(torch.stack([logits, logits]))
    assert batched.shape == (2, 9)


def test_solver_object_matches_function_and_backpropagates():
    x = _logits(6, dtype=torch.float32).requires_grad_()
    plan = Sinkhorn(tau=0.5, n_iter=30)(x)
    torch.testing.assert_close(plan, sinkhorn(x, 0.5, 30))
    plan.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_matrix_scaling_forward_equals_the_log_domain_iterates_and_falls_back_on_wide_ranges():
    from avalanche_rebasin.core.sinkhorn import _log_sinkhorn, _scaling_sinkhorn

    x = torch.randn(3, 40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 8
    plan, potentials = _scaling_sinkhorn(x, 25)
    log_plan = _log_sinkhorn(x, 25)
    assert torch.allclose(plan, log_plan.exp(), atol=1e-12, rtol=0)
    # they are the plan's column potentials: log P − X − β = α, one value per row
    alpha = plan.log() - x - potentials.unsqueeze(-2)
    assert torch.allclose(alpha, alpha[..., :1].expand_as(alpha), atol=1e-8, rtol=0)
    wide = x.float() * 10  # a range of X/τ beyond e^60: u, v could overflow in float32
    assert _scaling_sinkhorn(wide, 25) is None
    plan = sinkhorn(wide, tau=1.0, n_iter=25)
    assert torch.isfinite(plan).all() and torch.allclose(plan.sum(-2), torch.ones(3, 40), atol=1e-5)


def test_solver_object_validates_once_reports_convergence_and_stops_at_its_threshold():
    from avalanche_rebasin.core.sinkhorn import Sinkhorn

    for bad in (dict(tau=0.0), dict(n_iter=0), dict(n_iter=2.5), dict(backward="x"), dict(threshold=-1.0)):
        with pytest.raises(ValueError):
            Sinkhorn(**bad)
    x = torch.randn(2, 30, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    loose = Sinkhorn(n_iter=500, threshold=1e-3).solve(x)
    assert loose.balanced and loose.marginal_error <= 1e-3
    full = Sinkhorn(n_iter=500).solve(x)
    assert full.marginal_error < loose.marginal_error  # the threshold stopped the first one early
    short = Sinkhorn(n_iter=1).solve(x * 20)
    assert not short.balanced


def test_align_takes_a_configured_solver_and_reports_whether_it_converged():
    from rebasin_testkit import mlp

    from avalanche_rebasin import align, permute, random_permutation
    from avalanche_rebasin.core.sinkhorn import Sinkhorn

    torch.manual_seed(0)
    model, x = mlp(2, width=8), torch.randn(2, 20)
    spec = discover_spec(model, x)
    permuted = permute(model, spec, random_permutation(spec, torch.Generator().manual_seed(0)))
    run = dict(spec=spec, progress=False)  # a permuted copy: zero cost at step 0, so at_zero_cost=False
    result = align(
        model,
        permuted,
        **run,
        solver=Sinkhorn(tau=1.0, n_iter=50, threshold=1e-6),
        stopping=Stopping(at_zero_cost=False),
    )
    assert result.steps > 0 and result.plans_balanced and result.marginal_error <= 1e-6
    starved = align(
        model,
        permuted,
        **run,
        solver=Sinkhorn(n_iter=1),
        stopping=Stopping(max_steps=3, patience=None, at_zero_cost=False),
    )
    assert starved.steps == 3 and starved.marginal_error > 1e-3 and not starved.plans_balanced


@pytest.mark.parametrize("solver", ["auto", "cg"])
def test_conjugate_gradients_match_the_dense_solve_on_large_plans_with_and_without_a_warm_start(solver):
    """Above the size where "auto" stops solving densely, the matrix-free conjugate gradients
    (from zero, then from the last solution) give the dense Schur solve's gradient."""
    from avalanche_rebasin import WarmStart

    x = _logits(160, (2,)).requires_grad_()
    upstream = torch.randn(2, 160, 160, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (Sinkhorn(0.3, 200, linear_solver="schur")(x) * upstream).sum().backward()
    dense, x.grad = x.grad.clone(), None
    warm = WarmStart()
    for _ in range(2):  # cold, then warm from the first solve
        (Sinkhorn(0.3, 200, linear_solver=solver)(x, warm) * upstream).sum().backward()
        torch.testing.assert_close(x.grad, dense, atol=1e-9, rtol=1e-7)
        assert warm.solution is not None and warm.solution.shape == (2, 160)
        x.grad = None


def test_warm_started_forward_reaches_the_fixed_point_in_fewer_iterations_and_gives_the_same_plan():
    """From the last call's potentials, a slightly moved logit matrix needs a few iterations
    to the threshold where a cold start needs many; both plans are the same fixed point."""
    from avalanche_rebasin import WarmStart
    from avalanche_rebasin.core import sinkhorn as module

    x = _logits(50, dtype=torch.float64) * 6
    moved = x + 0.01 * torch.randn(50, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    solver = Sinkhorn(tau=0.5, n_iter=2000, threshold=1e-9)
    warm = WarmStart()
    solver(x, warm)
    counts = []
    original = module._scaling_sinkhorn

    def counting(*args, **kwargs):
        out = original(*args, **kwargs)
        counts.append(kwargs["init"] is not None)
        return out

    module._scaling_sinkhorn = counting
    try:
        cold = solver.solve(moved)
        hot = solver.solve(moved, warm)
    finally:
        module._scaling_sinkhorn = original
    assert counts == [False, True]  # the second call did start from the potentials
    assert cold.balanced and hot.balanced
    torch.testing.assert_close(hot.plan, cold.plan, atol=1e-8, rtol=0)
    iterations = {}
    for name, state in (("cold", None), ("warm", warm)):
        log_v = torch.zeros(50, dtype=torch.float64) if state is None else state.potentials
        kernel = (moved / 0.5 - (moved / 0.5).max()).exp()
        v, steps = log_v.exp(), 0
        while True:
            u = 1 / (kernel @ v)
            v = 1 / (kernel.T @ u)
            steps += 1
            if (u * (kernel @ v) - 1).abs().max() <= 1e-9:
                break
        iterations[name] = steps
    assert iterations["warm"] * 3 < iterations["cold"], iterations


def test_a_warm_start_of_another_shape_starts_cold():
    from avalanche_rebasin import WarmStart

    warm = WarmStart(potentials=torch.zeros(7), solution=torch.zeros(7))
    plan = Sinkhorn(n_iter=200)(_logits(5), warm)
    torch.testing.assert_close(plan, Sinkhorn(n_iter=200)(_logits(5)))
    assert warm.potentials.shape == (5,)

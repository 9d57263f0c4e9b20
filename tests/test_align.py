import pytest
import torch
import torchvision
from rebasin_testkit import assert_state_equal, mlp, randomize_batchnorm, state_copy, vgg11_bn_small
from torch import nn

from avalanche_rebasin import (
    Stopping,
    align,
    discover_spec,
    invert_permutation,
    permute,
    random_permutation,
    weight_matching,
)


def _recovers(model: nn.Module, x: torch.Tensor, seed: int, **kwargs) -> None:
    spec = discover_spec(model, x)
    perms = random_permutation(spec, torch.Generator().manual_seed(seed))
    model_b = permute(model, spec, perms)
    before_a, before_b = state_copy(model), state_copy(model_b)
    kwargs.setdefault("init", "identity")  # Sinkhorn on its own: weight matching would start exact
    result = align(model, model_b, spec=spec, progress=False, **kwargs)
    assert_state_equal(model, before_a)
    assert_state_equal(model_b, before_b)
    expected = invert_permutation(perms)
    for group in spec:
        assert torch.equal(result.permutations[group], expected[group]), group
    recovered = permute(model_b, spec, result.permutations).state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(recovered[name], tensor), name
    assert result.history[-1] < result.history[0]


@pytest.mark.parametrize("hidden_layers", [2, 4, 8])
def test_l2_alignment_recovers_random_permutation_of_mlp(hidden_layers):
    torch.manual_seed(hidden_layers)
    _recovers(
        mlp(hidden_layers, width=64),
        torch.randn(2, 20),
        seed=hidden_layers,
        lr=0.3,
        stopping=Stopping(max_steps=60),
    )


def test_l2_alignment_recovers_vgg11_bn():
    torch.manual_seed(0)
    model = randomize_batchnorm(vgg11_bn_small(), torch.Generator().manual_seed(0))
    _recovers(model, torch.randn(1, 3, 32, 32), seed=1, lr=0.3, stopping=Stopping(max_steps=30))


def test_l2_alignment_recovers_resnet18():
    torch.manual_seed(0)
    model = randomize_batchnorm(torchvision.models.resnet18(num_classes=10), torch.Generator().manual_seed(0))
    _recovers(model, torch.randn(1, 3, 32, 32), seed=2, lr=0.3, stopping=Stopping(max_steps=30))


def test_alignment_is_deterministic_and_reports_convergence():
    torch.manual_seed(0)
    model_a, model_b = mlp(2, width=16), mlp(2, width=16)
    x = torch.randn(2, 20)
    r1 = align(
        model_a,
        model_b,
        example_input=x,
        progress=False,
        seed=3,
        init="random",
        stopping=Stopping(max_steps=20),
    )
    r2 = align(
        model_a,
        model_b,
        example_input=x,
        progress=False,
        seed=3,
        init="random",
        stopping=Stopping(max_steps=20),
    )
    assert r1.history == r2.history
    assert all(torch.equal(r1.permutations[g], r2.permutations[g]) for g in r1.permutations)
    assert len(r1.history) == 20 and r1.marginal_error < 0.1 and r1.seconds > 0


def test_weight_matching_init_and_data_costs_run():
    torch.manual_seed(0)
    model_a, model_b = mlp(2, width=16), mlp(2, width=16)
    x = torch.randn(2, 20)
    wm = weight_matching(model_a, model_b, example_input=x)
    res = align(
        model_a,
        model_b,
        example_input=x,
        init="weight_matching",
        progress=False,
        stopping=Stopping(max_steps=0),
    )
    assert all(torch.equal(res.permutations[g], wm[g]) for g in wm)
    data = [(torch.randn(8, 20), torch.randint(0, 5, (8,))) for _ in range(3)]
    for cost in ("mid", "rnd", "l1", "cosine"):
        out = align(
            model_a,
            model_b,
            example_input=x,
            cost=cost,
            data=data,
            progress=False,
            stopping=Stopping(max_steps=5),
        )
        assert len(out.history) == 5 and all(torch.isfinite(torch.tensor(out.history)))
    with pytest.raises(ValueError, match="data="):
        align(model_a, model_b, example_input=x, cost="mid", progress=False, stopping=Stopping(max_steps=1))

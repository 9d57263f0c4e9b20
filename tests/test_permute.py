"""Every hard permutation must leave the network's function unchanged."""

import pytest
import torch
import torchvision
from avalanche.models import SimpleMLP
from rebasin_testkit import (
    LayerNormMLP,
    PreLNResidualMLP,
    SmallCNN,
    assert_state_equal,
    mlp,
    randomize_batchnorm,
    state_copy,
)
from torch import nn

from avalanche_rebasin import (
    discover_spec,
    invert_permutation,
    permute,
    permute_state,
    random_permutation,
)
from avalanche_rebasin.core.permute import soft_permute_state
from avalanche_rebasin.core.sinkhorn import permutation_matrix
from avalanche_rebasin.core.state import model_state

CASES = {
    "mlp": (lambda: mlp(3, bias=True), (6, 20), 3),
    "mlp_nobias": (lambda: mlp(3, bias=False), (6, 20), 3),
    "small_cnn": (SmallCNN, (4, 1, 16, 16), 3),
    "vgg11_bn": (lambda: torchvision.models.vgg11_bn(num_classes=10), (2, 3, 32, 32), 10),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 64, 64), 12),
    "avalanche_simple_mlp": (
        lambda: SimpleMLP(num_classes=10, input_size=28 * 28, hidden_size=64, hidden_layers=2, drop_rate=0.5),
        (5, 1, 28, 28),
        2,
    ),
    "layernorm_mlp": (LayerNormMLP, (5, 12), 2),
    "preln_residual_mlp": (PreLNResidualMLP, (5, 10), 3),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hard_permutation_preserves_function(name):
    factory, shape, n_groups = CASES[name]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = randomize_batchnorm(factory(), g).eval()
    x = torch.randn(*shape, generator=g)
    spec = discover_spec(model, x)
    assert len(spec) == n_groups
    perms = random_permutation(spec, generator=g)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    before = state_copy(model)
    permuted = permute(model, spec, perms).eval()
    assert_state_equal(model, before)  # the input model is untouched
    with torch.no_grad():
        expected, got = model(x), permuted(x)
    assert (expected - got).abs().max() <= 1e-5
    moved = [k for k in spec.axes if not torch.equal(model.state_dict()[k], permuted.state_dict()[k])]
    assert moved, "the permutation changed no tensor"


def test_permute_then_inverse_is_identity():
    model = mlp(2)
    spec = discover_spec(model, torch.randn(2, 20))
    perms = random_permutation(spec, torch.Generator().manual_seed(0))
    back = permute(permute(model, spec, perms), spec, invert_permutation(perms))
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k])


def test_soft_permutation_with_one_hot_plans_equals_hard():
    model = randomize_batchnorm(SmallCNN(), torch.Generator().manual_seed(0))
    spec = discover_spec(model, torch.randn(2, 1, 16, 16))
    perms = random_permutation(spec, torch.Generator().manual_seed(1))
    state = model_state(model)
    hard = permute_state(state, spec, perms)
    soft = soft_permute_state(state, spec, {g: permutation_matrix(p) for g, p in perms.items()})
    for k in state:
        torch.testing.assert_close(hard[k], soft[k])


def test_soft_permutation_is_differentiable():
    model = mlp(2)
    spec = discover_spec(model, torch.randn(2, 20))
    plans = {g: torch.full((n, n), 1.0 / n, requires_grad=True) for g, n in spec.group_sizes.items()}
    out = soft_permute_state(model_state(model), spec, plans)
    sum(v.sum() for v in out.values()).backward()
    assert all(p.grad is not None for p in plans.values())


def test_training_mode_model_is_restored_after_discovery():
    model = SmallCNN().train()
    before = state_copy(model)
    discover_spec(model, torch.randn(3, 1, 16, 16))
    assert model.training and all(m.training for m in model.modules())
    assert_state_equal(model, before)  # BatchNorm statistics were not updated


def test_invalid_permutation_index_is_rejected():
    model = mlp(2)
    spec = discover_spec(model, torch.randn(2, 20))
    perms = random_permutation(spec)
    group = spec.groups[0]
    perms[group] = torch.zeros_like(perms[group])
    with pytest.raises(ValueError, match="not a permutation"):
        permute(model, spec, perms)


def test_linear_without_permutable_input_keeps_input_axis():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    spec = discover_spec(model, torch.randn(1, 4))
    assert spec.axes["0.weight"][1] is None and spec.axes["0.weight"][0] is not None
    assert "2.bias" not in spec.axes  # the output is never permuted

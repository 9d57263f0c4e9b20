"""Bad input gets a clear error naming the problem; nothing the user had is lost."""

import pytest
import torch
from rebasin_testkit import assert_state_equal, mlp, state_copy
from torch import nn

from avalanche_rebasin import (
    Sinkhorn,
    UnsupportedOperationError,
    align,
    discover_spec,
    weight_matching,
)


def test_different_architectures_are_rejected():
    x = torch.randn(2, 20)
    with pytest.raises(ValueError, match="different architectures"):
        align(mlp(2, width=16), mlp(2, width=24), example_input=x, progress=False)
    with pytest.raises(ValueError, match="different architectures"):
        weight_matching(mlp(2, width=16), mlp(3, width=16), example_input=x)


def test_nonpositive_temperature_is_rejected():
    a, b = mlp(2), mlp(2)
    with pytest.raises(ValueError, match="tau"):
        align(a, b, example_input=torch.randn(2, 20), progress=False, solver=Sinkhorn(tau=0.0))


def test_nan_weights_are_rejected_and_models_kept():
    a, b = mlp(2), mlp(2)
    with torch.no_grad():
        b[1].weight[0, 0] = float("nan")
    before_a, before_b = state_copy(a), state_copy(b)
    with pytest.raises(ValueError, match=r"NaN.*'1\.weight'"):
        align(a, b, example_input=torch.randn(2, 20), progress=False)
    assert_state_equal(a, before_a)
    assert all(torch.equal(v, before_b[k]) or torch.isnan(v).any() for k, v in b.state_dict().items())


def test_unsupported_layer_is_named():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)
            self.pair = nn.Bilinear(4, 4, 2)

        def forward(self, x):
            h = self.fc(x)
            return self.pair(h, h)

    with pytest.raises(UnsupportedOperationError, match=r"bilinear.*module 'pair' \(Bilinear\)"):
        discover_spec(Pair(), torch.randn(2, 3))


def test_missing_example_input_is_explained():
    with pytest.raises(ValueError, match="example_input"):
        align(mlp(2), mlp(2), progress=False)

"""Activation matching and the straight-through estimator on two trained MLPs."""

import pytest
import torch
from rebasin_testkit import assert_state_equal, state_copy, teacher_task, train_mlp

from avalanche_rebasin import discover_spec, lmc_curve, permute
from avalanche_rebasin.alignment.matching import activation_matching, straight_through


@pytest.fixture(scope="module")
def trained_pair():
    x, y = teacher_task(1500, seed=0)
    xt, yt = teacher_task(1000, seed=1)
    return train_mlp(1, x, y, width=32, epochs=10), train_mlp(2, x, y, width=32, epochs=10), (x, y), (xt, yt)


def _barrier(model_a, model_b, test):
    xt, yt = test

    def loss(m):
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(m(xt), yt))

    return lmc_curve(model_a, model_b, loss, n_points=11).barrier


@pytest.mark.parametrize("method", ["activation", "straight_through"])
def test_baseline_returns_permutations_that_lower_the_barrier(trained_pair, method):
    model_a, model_b, (x, y), test = trained_pair
    spec = discover_spec(model_a, x[:2])
    batches = list(zip(x.split(250), y.split(250)))
    before_a, before_b = state_copy(model_a), state_copy(model_b)
    if method == "activation":
        perms = activation_matching(model_a, model_b, batches, spec=spec)
    else:
        perms = straight_through(model_a, model_b, batches, spec=spec, steps=25, progress=False)
    assert_state_equal(model_a, before_a)
    assert_state_equal(model_b, before_b)
    assert perms.keys() == spec.group_sizes.keys()
    for group, idx in perms.items():
        assert torch.equal(torch.sort(idx).values, torch.arange(spec.group_sizes[group]))
    naive = _barrier(model_a, model_b, test)
    aligned = _barrier(model_a, permute(model_b, spec, perms), test)
    assert aligned < 0.5 * naive, (naive, aligned)

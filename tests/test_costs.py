import torch
from rebasin_testkit import mlp

from avalanche_rebasin import (
    CosineCost,
    L1Cost,
    L2Cost,
    MidpointCost,
    discover_spec,
    permute_state,
    random_permutation,
)
from avalanche_rebasin.core.costs import continual_cost
from avalanche_rebasin.core.state import functional_loss, interpolate_state, model_state


def test_weight_costs_vanish_on_identical_states_and_are_positive_otherwise():
    a, b = model_state(mlp(2)), model_state(mlp(2))
    for cost in (L2Cost(), L1Cost(), CosineCost()):
        assert abs(float(cost(a, a))) < 1e-6
        assert float(cost(a, b)) > 0
    manual = sum(((a[k] - b[k]) ** 2).sum() for k in a)
    torch.testing.assert_close(L2Cost()(a, b), manual)


def test_midpoint_cost_is_the_loss_of_the_averaged_network():
    torch.manual_seed(0)
    model, other = mlp(2), mlp(2)
    batch = (torch.randn(16, 20), torch.randint(0, 5, (16,)))
    a, b = model_state(model), model_state(other)
    expected = functional_loss(model, interpolate_state(a, b, 0.5), batch, torch.nn.functional.cross_entropy)
    torch.testing.assert_close(MidpointCost(model)(a, b, batch), expected)


def test_continual_cost_matches_its_formula_and_leaves_model_alone():
    torch.manual_seed(0)
    model = mlp(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(16, 20), torch.randint(0, 5, (16,))
    theta = model_state(model)
    spec = discover_spec(model, x)
    permuted = permute_state(theta, spec, random_permutation(spec, torch.Generator().manual_seed(0)))
    delta = {k: 0.01 * torch.randn_like(v) for k, v in theta.items()}
    beta = 0.3
    got = continual_cost(model, theta, permuted, delta, (x, y), torch.nn.functional.cross_entropy, beta)
    merged = {k: (theta[k] + permuted[k]) / 2 + delta[k] for k in theta}
    manual = torch.nn.functional.cross_entropy(torch.func.functional_call(model, merged, (x,)), y)
    manual = manual + beta * sum((d**2).sum() for d in delta.values())
    torch.testing.assert_close(got, manual)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_interpolate_state_is_lerp_for_finite_states_and_keeps_masks_where_one_tensor_is_infinite():
    from avalanche_rebasin.core.state import all_finite

    inf = float("inf")
    a = {"w": torch.randn(3, 4), "mask": torch.tensor([0.0, -inf]), "count": torch.tensor(5)}
    b = {"w": torch.randn(3, 4), "mask": torch.tensor([-inf, -inf]), "count": torch.tensor(9)}
    out = interpolate_state(a, b, 0.25)
    assert torch.equal(out["w"], torch.lerp(a["w"], b["w"], 0.25))
    assert torch.equal(out["mask"], torch.tensor([-inf, -inf])) and torch.equal(out["count"], a["count"])
    # entries whose sum overflows are finite: the careful path still returns plain lerp
    big = {"w": torch.full((4,), 3e38)}
    assert not all_finite(big.values())
    assert torch.equal(interpolate_state(big, big, 0.5)["w"], big["w"])
    assert all_finite([torch.empty(0), torch.ones(2)]) and not all_finite([torch.tensor([float("nan")])])

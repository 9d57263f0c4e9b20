"""align stops by itself once the hard permutation has converged, and says why it stopped."""

import pytest
import torch
from rebasin_testkit import mlp

from avalanche_rebasin import Stopping, align, discover_spec, permute, random_permutation
from avalanche_rebasin.alignment.convergence import Convergence, ZeroCost, greedy_permutations
from avalanche_rebasin.core.blocks import blocked_hard_permutation
from avalanche_rebasin.core.costs import L2Cost


def _permuted_pair(hidden_layers: int = 4, width: int = 10):
    torch.manual_seed(0)
    model, x = mlp(hidden_layers, width=width), torch.randn(2, 20)
    spec = discover_spec(model, x)
    return model, permute(model, spec, random_permutation(spec, torch.Generator().manual_seed(1))), spec


@pytest.mark.parametrize("init", ["identity", "weight_matching"])
def test_align_stops_once_converged_and_is_exact(init):
    model, permuted, spec = _permuted_pair()
    result = align(
        model,
        permuted,
        spec=spec,
        init=init,
        progress=False,
        stopping=Stopping(max_steps=500, at_zero_cost=False),
    )
    assert result.stop_reason == "converged" and result.converged
    assert result.steps < (100 if init == "identity" else 10)  # a cap, not a schedule
    recovered = result.model.state_dict()
    assert all(torch.equal(recovered[k], v) for k, v in model.state_dict().items())


def test_a_permuted_copy_stops_at_zero_cost_before_any_step_from_weight_matching():
    model, permuted, spec = _permuted_pair()
    result = align(model, permuted, spec=spec, progress=False)
    assert (result.stop_reason, result.steps, result.converged) == ("optimal", 0, True)
    assert result.marginal_error is None and result.plans_balanced  # no Sinkhorn step ran
    recovered = result.model.state_dict()
    assert all(torch.equal(recovered[k], v) for k, v in model.state_dict().items())


def test_zero_cost_stops_the_sinkhorn_loop_as_soon_as_the_permutation_is_right():
    model, permuted, spec = _permuted_pair()
    kwargs = dict(spec=spec, init="identity", progress=False)
    zero = align(model, permuted, **kwargs, stopping=Stopping(max_steps=500))
    patient = align(model, permuted, **kwargs, stopping=Stopping(max_steps=500, at_zero_cost=False))
    assert zero.stop_reason == "optimal" and 0 < zero.steps < patient.steps
    assert zero.marginal_error is not None and zero.marginal_error >= 0  # a plan ran this time
    recovered = zero.model.state_dict()
    assert all(torch.equal(recovered[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("stopping", [Stopping(max_steps=500), Stopping(max_steps=500, at_zero_cost=False)])
def test_the_callback_sees_every_step_the_one_a_stopping_rule_ends_on_too(stopping):
    model, permuted, spec = _permuted_pair()
    seen: list[int] = []
    result = align(
        model,
        permuted,
        spec=spec,
        init="identity",
        progress=False,
        stopping=stopping,
        callback=lambda step, *_: seen.append(step),
    )
    assert result.stop_reason in ("optimal", "converged")
    assert seen == list(range(result.steps))


@pytest.mark.parametrize("cost", ["l2", "l1", "cosine"])
def test_zero_cost_never_fires_for_a_model_that_is_not_a_permuted_copy(cost):
    model, permuted, spec = _permuted_pair()
    noisy = permute(model, spec, random_permutation(spec, torch.Generator().manual_seed(1)))
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(1e-4 * torch.randn_like(p))  # off by far less than any unit's weights
    result = align(model, noisy, spec=spec, cost=cost, progress=False, stopping=Stopping(max_steps=60))
    assert result.stop_reason in ("converged", "max_steps")
    expected = align(model, permuted, spec=spec, progress=False).permutations
    assert all(torch.equal(result.permutations[g], p) for g, p in expected.items())


def test_zero_cost_tolerance_is_round_off_relative_to_the_weights():
    model, permuted, spec = _permuted_pair()
    state_a = {k: v for k, v in model.state_dict().items() if k in spec.axes}
    state_b = {k: v for k, v in permuted.state_dict().items() if k in spec.axes}
    rule = ZeroCost(L2Cost(list(state_a)), state_a, state_b, spec)
    perms = align(model, permuted, spec=spec, progress=False).permutations
    right = torch.cat([perms[g] for g in spec.group_sizes])
    wrong = torch.cat([torch.arange(n) for n in spec.group_sizes.values()])
    assert not rule.reached(wrong, torch.tensor(True))
    assert not rule.reached(right, torch.tensor(False))  # not a permutation: never read
    assert rule.reached(right, torch.tensor(True))
    assert 0 < rule.tolerance < 1e-9


def test_without_patience_every_step_runs_and_other_reasons_are_reported():
    model, permuted, spec = _permuted_pair()
    full = align(
        model,
        permuted,
        spec=spec,
        progress=False,
        stopping=Stopping(max_steps=40, patience=None, at_zero_cost=False),
    )
    assert (full.steps, full.stop_reason, full.converged) == (40, "max_steps", False)
    stopped = align(
        model,
        permuted,
        spec=spec,
        progress=False,
        callback=lambda step, *_: step == 2,
        stopping=Stopping(max_steps=40, at_zero_cost=False),
    )
    assert (stopped.steps, stopped.stop_reason) == (3, "callback")
    with pytest.raises(ValueError, match="patience"):
        align(model, permuted, spec=spec, progress=False, stopping=Stopping(patience=0))


def test_convergence_needs_a_stable_valid_permutation_and_a_cost_that_does_not_rise():
    same, valid, invalid = torch.tensor([1, 0, 2]), torch.tensor(True), torch.tensor(False)
    rule = Convergence(Stopping(patience=2, rtol=0.0))
    assert not any(rule.update(c, same, valid) for c in (5.0, 4.0, 3.0)[:2])
    assert rule.update(3.0, same, valid)  # unchanged for two steps, cost falling
    rising = Convergence(Stopping(patience=2, rtol=0.0))
    assert not any(rising.update(c, same, valid) for c in (1.0, 2.0, 3.0, 4.0))
    not_a_permutation = Convergence(Stopping(patience=2, rtol=0.0))
    assert not any(not_a_permutation.update(c, same, invalid) for c in (3.0, 2.0, 1.0, 0.5))


@pytest.mark.parametrize("blocks", [1, 3])
def test_row_argmax_that_is_a_permutation_is_the_linear_assignment(blocks):
    generator = torch.Generator().manual_seed(0)
    checked = 0
    for _ in range(200):
        logits = (
            torch.randn(6, 6, generator=generator) + 3 * torch.eye(6)[torch.randperm(6, generator=generator)]
        )
        greedy, valid = greedy_permutations({"g": logits}, {"g": blocks})
        if bool(valid):
            checked += 1
            assert torch.equal(greedy, blocked_hard_permutation(logits, blocks))
    assert checked > 20

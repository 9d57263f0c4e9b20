"""The trained network's two association orders (weight space, activation space) compute the
same function and gradients, and the automatic choice follows the flop count."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avalanche_rebasin import RebasinConfig, Sinkhorn, discover_spec
from avalanche_rebasin.continual.association import MixedLinearWeight, activations_are_cheaper
from avalanche_rebasin.continual.rebasin import RebasinNetwork
from avalanche_rebasin.core.sinkhorn import marginal_error


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5)
    ).double()


def _run(model: nn.Module, x: torch.Tensor, association: str, train: bool = True, spec=None, **settings):
    spec = spec or discover_spec(model, x[:2])
    config = RebasinConfig(association=association, perm_init_noise=1.0, delta_init_std=0.1, **settings)
    network = RebasinNetwork(model, spec, config, experience=1).double()
    network.train(train)
    out = network(x)
    out.square().sum().backward()
    grads = {name: p.grad.clone() for name, p in network.named_parameters()}
    return network, out.detach(), grads


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("straight_through", [False, True])
def test_weight_and_activation_space_give_the_same_function_and_gradients(train, straight_through):
    x = torch.randn(7, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    results = {
        order: _run(_mlp(), x, order, train, straight_through=straight_through)
        for order in ("weight", "activation")
    }
    (_, out_w, grads_w), (network, out_a, grads_a) = results["weight"], results["activation"]
    assert set(network.linear_groups) == {"0.weight", "2.weight", "4.weight"}
    assert network.linear_groups["2.weight"] == ("2", "0")  # both axes permuted
    torch.testing.assert_close(out_a, out_w, atol=1e-12, rtol=0)
    assert grads_a.keys() == grads_w.keys() and any("logits" in k for k in grads_a)
    for name in grads_w:
        assert grads_w[name].abs().max() > 0, name
        torch.testing.assert_close(grads_a[name], grads_w[name], atol=1e-11, rtol=1e-9, msg=name)


def test_the_automatic_order_follows_the_flop_count(monkeypatch):
    # a 784→512 layer permuted at its output: activation space at batch 32, weight space at 500
    assert activations_are_cheaper(32, 512, 784, True, False)
    assert not activations_are_cheaper(500, 512, 784, True, False)
    # a 512→10 head permuted at its input: forming W P_inᵀ (10·512²) is cheaper than h·P_in
    assert not activations_are_cheaper(32, 10, 512, False, True)
    formed = []
    original = MixedLinearWeight.formed

    def counting(self):
        formed.append(tuple(self.shape))
        return original(self)

    monkeypatch.setattr(MixedLinearWeight, "formed", counting)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 10))
    spec = discover_spec(model, torch.randn(2, 784))
    network = RebasinNetwork(model, spec, RebasinConfig(), experience=1)
    network(torch.randn(32, 784))
    assert formed == [(10, 512)]  # only the head was formed; the wide layer ran on activations
    formed.clear()
    network(torch.randn(500, 784))
    assert sorted(formed) == [(10, 512), (512, 784)]


class _ReadsItsWeight(nn.Module):
    """A linear layer used without its own forward, plus a hook that reads the weight."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 16)
        self.out = nn.Linear(16, 3)
        self.seen: list[float] = []

    def watch(self) -> None:
        self.out.register_forward_hook(
            lambda module, args, result: self.seen.append(float(module.weight.detach().sum()))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(x @ self.fc.weight.t() + self.fc.bias)  # not F.linear
        return self.out(hidden)


def test_every_other_use_of_a_mixed_weight_sees_the_formed_weight():
    torch.manual_seed(0)
    model = _ReadsItsWeight().double()
    x = torch.randn(5, 12, dtype=torch.float64)
    spec = discover_spec(model, x[:2])
    model.watch()
    seen = []
    for order in ("weight", "activation"):
        seen.append((*_run(model, x, order, spec=spec), model.seen[-1]))
    (_, out_w, grads_w, hook_w), (net_a, out_a, grads_a, hook_a) = seen
    assert "fc.weight" in net_a.linear_groups and "out.weight" in net_a.linear_groups
    torch.testing.assert_close(out_a, out_w, atol=1e-12, rtol=0)
    assert hook_a == pytest.approx(hook_w, abs=1e-12)  # the hook saw W_mid
    assert hook_a != pytest.approx(float(model.out.weight.sum()), abs=1e-6)  # not θ
    for name in grads_w:
        torch.testing.assert_close(grads_a[name], grads_w[name], atol=1e-11, rtol=1e-9, msg=name)


def test_a_mixed_weight_answers_metadata_without_forming_and_never_shows_theta():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    spec = discover_spec(model, torch.randn(2, 6))
    network = RebasinNetwork(
        model, spec, RebasinConfig(perm_init_noise=1.0, delta_init_std=0.1), experience=1
    )
    weight = network.trained_state()["0.weight"]
    assert isinstance(weight, MixedLinearWeight)
    assert weight.shape == (8, 6) and weight.dtype == torch.float32 and weight.dim() == 2
    assert weight._formed is None  # metadata did not form it
    reference = RebasinNetwork(
        model,
        spec,
        RebasinConfig(perm_init_noise=1.0, delta_init_std=0.1, association="weight"),
        experience=1,
    )
    expected = reference.trained_state()["0.weight"]
    torch.testing.assert_close(weight * 1.0, expected, atol=1e-6, rtol=0)  # any op reads W_mid, not θ
    assert not torch.allclose(weight * 1.0, model[0].weight)
    assert F.linear(torch.eye(6), weight).T.shape == (8, 6)


def test_frozen_and_subclassed_linear_layers_stay_in_weight_space():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    model = nn.Sequential(Scaled(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    model[2].weight.requires_grad_(False)
    spec = discover_spec(model, torch.randn(2, 6))
    network = RebasinNetwork(model, spec, RebasinConfig(), experience=1)
    assert "0.weight" not in network.linear_groups and "2.weight" not in network.linear_groups


def test_warm_started_plans_reach_the_cold_fixed_point_and_the_paper_preset_starts_cold():
    paper = RebasinConfig.from_preset("paper")
    assert not paper.warm_start and paper.sinkhorn.threshold is None and paper.sinkhorn.n_iter == 20
    assert RebasinConfig().warm_start and RebasinConfig().sinkhorn.threshold == 1e-4
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 5))
    spec = discover_spec(model, torch.randn(2, 12))
    config = RebasinConfig(sinkhorn=Sinkhorn(tau=0.3, n_iter=20, threshold=1e-6), perm_lr=0.3)
    network = RebasinNetwork(model, spec, config, experience=1)
    optimizer = torch.optim.Adam(network.parameters(), lr=0.3)
    for _ in range(15):  # the logits sharpen, each step's forward starts from the last
        optimizer.zero_grad()
        network(torch.randn(16, 12)).square().mean().backward()
        optimizer.step()
    warm = network.plans()["0"]
    assert network.permutation.warm_starts[0].potentials is not None
    cold = Sinkhorn(tau=0.3, n_iter=2000, threshold=1e-7)(network.permutation.logits[0].detach())
    assert float(cold.max(-1).values.mean()) > 0.1  # far from the uniform plan
    cold_20 = Sinkhorn(tau=0.3, n_iter=20)(network.permutation.logits[0].detach())
    # at the same 20-iteration cap, the warm start is nearer the fixed point than a cold start
    assert marginal_error(warm) < marginal_error(cold_20) / 10
    assert (warm.detach() - cold).abs().max() < (cold_20 - cold).abs().max() / 10

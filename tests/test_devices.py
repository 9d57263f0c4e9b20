"""Device-agnostic checks, on the device ``pytest --device`` names (the CPU by default;
``benchmarks/gpu_check.py`` runs them with ``--device cuda``): every tensor the code makes is
made on its input's device, and the results match the CPU's."""

import torch
from rebasin_testkit import mlp

from avalanche_rebasin import (
    RebasinConfig,
    Sinkhorn,
    WarmStart,
    align,
    discover_spec,
    permute,
    random_permutation,
)
from avalanche_rebasin.continual.rebasin import RebasinNetwork, committed_state, make_optimizer


def test_sinkhorn_with_warm_starts_runs_on_the_device_and_matches_the_cpu(device):
    g = torch.Generator().manual_seed(0)
    logits = (torch.eye(160) + 0.3 * torch.randn(2, 160, 160, generator=g)).double()
    upstream = torch.randn(2, 160, 160, generator=g, dtype=torch.float64)
    grads = []
    for where in ("cpu", device):
        x = logits.to(where).requires_grad_()
        warm = WarmStart()
        for _ in range(2):
            plan = Sinkhorn(tau=0.5, n_iter=300, threshold=1e-10)(x, warm)
            x.grad = None
            (plan * upstream.to(where)).sum().backward()
        assert plan.device.type == torch.device(where).type and warm.potentials.device == plan.device
        grads.append(x.grad.cpu())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-9, rtol=1e-7)


def test_a_rebasin_step_and_commit_run_on_the_device(device):
    torch.manual_seed(0)
    model = mlp().to(device)
    x = torch.randn(32, 20, device=device)
    spec = discover_spec(model, x[:2])
    network = RebasinNetwork(model, spec, RebasinConfig(perm_init_noise=1.0), experience=1).to(device)
    optimizer = make_optimizer(network)
    for _ in range(3):
        optimizer.zero_grad()
        network(x).square().mean().backward()
        optimizer.step()
    state = committed_state(network)
    assert all(t.device.type == device.type for t in state.values())
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_align_recovers_a_permutation_on_the_device(device):
    torch.manual_seed(0)
    a = mlp().to(device)
    x = torch.randn(4, 20, device=device)
    spec = discover_spec(a, x)
    b = permute(a, spec, random_permutation(spec, torch.Generator().manual_seed(1), device=device))
    result = align(a, b, example_input=x, progress=False)
    for name, p in result.model.named_parameters():
        torch.testing.assert_close(p, dict(a.named_parameters())[name], atol=1e-6, rtol=0)

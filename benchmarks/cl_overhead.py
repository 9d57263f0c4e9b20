"""What Re-basin costs per experience next to Naive, at equal data and epochs, and its floor.

    OMP_NUM_THREADS=1 python benchmarks/cl_overhead.py            # -> results/speed/cl_overhead.{md,json}

Five settings: Avalanche's ``SimpleMLP`` on 784-pixel inputs at batch 32, 256 and 500, a
small BatchNorm CNN and ``SlimResNet18`` on 3×32×32 inputs at batch 32. Each runs a class-incremental
stream of synthetic data (no replay) with Naive, Re-basin (the default configuration:
δ and permutation logits trained for the same epochs as Naive, BatchNorm re-estimated
at the commit) and Re-basin without the permutation (δ only). Reported: the median
wall time of ``strategy.train(experience)`` over the experiences after the first (the
first experience of Re-basin is ordinary training), and its ratio to Naive. Each setting
runs at two experience sizes (n and 2n images), which splits that time into a cost per
optimiser step (the slope) and a fixed cost per experience (the intercept: the commit,
BatchNorm re-estimation, diagnostics, Avalanche's own per-experience work).
The floor: the matrix-product flops (``torch.utils.flop_counter.FlopCounterMode``: matmuls
and convolutions, the Sinkhorn iterations' and conjugate gradients' matrix-vector products
included) of one Re-basin training step (forward and backward of the trained network) at
its cheapest association order, over Naive's; the element-wise work (optimisers, the
plans' exponentials) is not counted, so a measured ratio near its floor means little
beyond the arithmetic is left. Strategies alternate within each repeat (``--repeats``),
one thread, one process; the medians are reported.
``--profile`` adds cProfile's view of one Re-basin experience (SimpleMLP, batch 32):
``results/speed/cl_profile.txt``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import pstats
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
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from avalanche_rebasin import RebasinConfig, RebasinStrategy, discover_spec
from avalanche_rebasin.continual.rebasin import RebasinNetwork


def batchnorm_cnn() -> nn.Module:
    """Three 3×3 convolutions with BatchNorm (32, 64, 128 channels), pooling, a linear head."""
    layers: list[nn.Module] = []
    for n_in, n_out in ((3, 32), (32, 64), (64, 128)):
        layers += [nn.Conv2d(n_in, n_out, 3, padding=1), nn.BatchNorm2d(n_out), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


SETTINGS = {
    "SimpleMLP, batch 32": (lambda: SimpleMLP(num_classes=10), (1, 28, 28), 32, 2000),
    "SimpleMLP, batch 256": (lambda: SimpleMLP(num_classes=10), (1, 28, 28), 256, 4000),
    "SimpleMLP, batch 500": (lambda: SimpleMLP(num_classes=10), (1, 28, 28), 500, 4000),
    "BatchNorm CNN 32x32, batch 32": (batchnorm_cnn, (3, 32, 32), 32, 1000),
    "SlimResNet18 32x32, batch 32": (lambda: SlimResNet18(nclasses=10), (3, 32, 32), 32, 500),
}
STRATEGIES = ("naive", "rebasin", "rebasin-delta-only")


def _stream(shape: tuple[int, ...], per_experience: int, experiences: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = per_experience * experiences
    y = torch.arange(n) % 10
    x = torch.randn(10, *shape, generator=g)[y] + torch.randn(n, *shape, generator=g)
    train = _make_taskaware_tensor_classification_dataset(x, y)
    test = _make_taskaware_tensor_classification_dataset(x[:100], y[:100])
    return nc_benchmark(train, test, n_experiences=experiences, task_labels=False, seed=seed)


def _strategy(name: str, model: torch.nn.Module, batch: int, device: str = "cpu"):
    common = dict(
        device=device,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        train_mb_size=batch,
        train_epochs=1,
        eval_mb_size=500,
        evaluator=EvaluationPlugin(loggers=[]),
    )
    if name == "naive":
        return Naive(model=model, **common)
    return RebasinStrategy(model=model, permute=name == "rebasin", seed=0, **common)


def measure(setting: str, name: str, experiences: int, scale: int = 1, device: str = "cpu") -> list[float]:
    """Seconds of ``strategy.train`` per experience after the first, ``scale``·n images each."""
    factory, shape, batch, per_experience = SETTINGS[setting]
    torch.manual_seed(0)
    strategy = _strategy(name, factory(), batch, device)
    seconds = []
    for experience in _stream(shape, scale * per_experience, experiences).train_stream:
        start = time.perf_counter()
        strategy.train(experience)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds[1:]


def step_flops(setting: str, name: str, association: str = "auto") -> int:
    """Matrix-product flops of one training step's forward and backward (no optimiser)."""
    factory, shape, batch, _ = SETTINGS[setting]
    torch.manual_seed(0)
    model = factory().train()
    x, y = torch.randn(batch, *shape), torch.arange(batch) % 10
    if name != "naive":
        spec = discover_spec(model, x[:2])
        config = RebasinConfig(permute=name == "rebasin", association=association)
        model = RebasinNetwork(model, spec, config, experience=1).train()
        model(x)  # the step before: the warm start a training step begins from
    counter = FlopCounterMode(display=False)
    with counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    return counter.get_total_flops()


def flop_floor(setting: str, name: str) -> float:
    """The step's flops at its cheapest association order over Naive's."""
    naive = step_flops(setting, "naive")
    if name == "naive":
        return 1.0
    orders = ("auto", "weight", "activation") if name == "rebasin" else ("auto",)
    return min(step_flops(setting, name, order) for order in orders) / naive


def split_cost(setting: str, small: float, large: float) -> tuple[float, float]:
    """(seconds per optimiser step, fixed seconds per experience) from the n and 2n medians."""
    _, _, batch, n = SETTINGS[setting]
    steps_small, steps_large = math.ceil(n / batch), math.ceil(2 * n / batch)
    per_step = (large - small) / (steps_large - steps_small)
    return per_step, small - per_step * steps_small


def profile_one_experience(out: Path, top: int = 25) -> None:
    """cProfile of Re-basin's second experience (SimpleMLP, batch 32), by cumulative time."""
    setting = "SimpleMLP, batch 32"
    factory, shape, batch, per_experience = SETTINGS[setting]
    torch.manual_seed(0)
    strategy = _strategy("rebasin", factory(), batch)
    first, second = list(_stream(shape, per_experience, 2).train_stream)
    strategy.train(first)
    profiler = cProfile.Profile()
    profiler.runcall(strategy.train, second)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(top)
    (out / "cl_profile.txt").write_text(f"{setting}, Re-basin, experience 2, one thread\n{text.getvalue()}")
    print(text.getvalue())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiences", type=int, default=5, help="a divisor of 10")
    p.add_argument("--repeats", type=int, default=2, help="alternating repeats per setting (medians)")
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument(
        "--device", default="cpu", help="where the strategies train (the floors are counted on the CPU)"
    )
    p.add_argument("--out", default="results/speed")
    p.add_argument("--profile", action="store_true", help="also write cl_profile.txt")
    args = p.parse_args()
    rows, records = [], []
    for setting in args.settings:
        seconds: dict[str, dict[int, list[float]]] = {name: {1: [], 2: []} for name in STRATEGIES}
        for _ in range(args.repeats):  # the strategies alternate, so a drift in load hits all
            for name in STRATEGIES:
                for scale in (1, 2):
                    seconds[name][scale] += measure(setting, name, args.experiences, scale, args.device)
        medians, steps = {}, {}
        for name in STRATEGIES:
            small, large = seconds[name][1], seconds[name][2]
            medians[name] = statistics.median(small)
            steps[name] = split_cost(setting, medians[name], statistics.median(large))
            floor = flop_floor(setting, name)
            records.append(
                {
                    "setting": setting,
                    "strategy": name,
                    "seconds_n": small,
                    "seconds_2n": large,
                    "flop_floor": floor,
                }
            )
            print(
                f"{setting:32s} {name:20s} {medians[name]:.3f} s/experience, floor {floor:.2f}×", flush=True
            )
        for name, value in medians.items():
            per_step, fixed = steps[name]
            ratio, floor = (
                per_step / steps["naive"][0],
                records[-len(STRATEGIES) + STRATEGIES.index(name)]["flop_floor"],
            )
            rows.append(
                [
                    setting,
                    name,
                    f"{value:.3f}",
                    f"{value / medians['naive']:.2f}×",
                    f"{1e3 * per_step:.2f}",
                    f"{ratio:.2f}×",
                    f"{floor:.2f}×",
                    f"{ratio / floor:.2f}",
                    f"{fixed:.3f}",
                ]
            )
    header = [
        "setting",
        "strategy",
        "train s / experience",
        "ratio",
        "ms / step",
        "step ratio",
        "flop floor",
        "step ratio / floor",
        "fixed s / exp",
    ]
    table = markdown_table(header, rows)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cl_overhead.md").write_text(table + "\n")
    write_json(
        out / "cl_overhead.json", {"threads": torch.get_num_threads(), "device": args.device, "runs": records}
    )
    if args.profile:
        profile_one_experience(out)


if __name__ == "__main__":
    main()

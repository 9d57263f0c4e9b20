"""Run one (strategy, seed): train experience by experience, evaluate the whole test stream after
each, and return a JSON-ready record with Avalanche's metrics, timings and provenance."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics
from avalanche.logging import BaseLogger, CSVLogger
from avalanche.training import JointTraining
from avalanche.training.plugins import EvaluationPlugin
from tqdm.auto import tqdm

from avalanche_rebasin.avalanche.interpolation_plugin import WeightInterpolationPlugin
from avalanche_rebasin.avalanche.plugin import RebasinPlugin

from .benchmarks import BENCHMARKS
from .strategies import build

__all__ = ["EpochProgress", "provenance", "run_one"]

STREAM_ACC = "Top1_Acc_Stream/eval_phase/test_stream"
STREAM_FORGETTING = "StreamForgetting/eval_phase/test_stream"
EXP_ACC = "Top1_Acc_Exp/eval_phase/test_stream"
PACKAGES = ("avalanche-rebasin", "avalanche-lib", "torch", "torchvision", "numpy", "scipy")


class EpochProgress(SupervisedPlugin):
    """One progress bar per run, advanced after every training epoch ("epoch 37/100")."""

    def __init__(self, total_epochs: int, label: str) -> None:
        super().__init__()
        self.bar = tqdm(total=total_epochs, desc=label, unit="epoch", leave=False, dynamic_ncols=True)

    def after_training_epoch(self, strategy, *args, **kwargs) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def provenance(args: argparse.Namespace) -> dict[str, Any]:
    """Library versions, the git commit of this checkout (if it is one) and the arguments."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    source = Path(__file__).resolve().parents[1]
    commit = _git(source, "rev-parse", "HEAD")
    dirty = _git(source, "status", "--porcelain", "--untracked-files=no")
    return {
        "versions": {"python": platform.python_version(), **versions},
        "git_commit": commit,
        "git_dirty": bool(dirty) if commit else None,
        "argv": sys.argv[1:],
        "args": {
            k: v if isinstance(v, int | float | str | bool | None) else str(v) for k, v in vars(args).items()
        },
        "threads": torch.get_num_threads(),
        "device": args.device,
    }


def _git(folder: Path, *command: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(folder), *command], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _pick(results: dict[str, float], prefix: str) -> float | None:
    return next((float(v) for k, v in results.items() if k.startswith(prefix)), None)


def _per_experience(results: dict[str, float]) -> dict[int, float]:
    out = {int(k.rsplit("Exp", 1)[1]): float(v) for k, v in results.items() if k.startswith(EXP_ACC)}
    return dict(sorted(out.items()))


def _row(after: int, results: dict[str, float], joint: bool) -> dict[str, Any]:
    forgetting = 0.0 if joint else _pick(results, STREAM_FORGETTING) or 0.0
    return {
        "after": after,
        "acc": _pick(results, STREAM_ACC),
        "forgetting": forgetting,
        "per_exp": _per_experience(results),
    }


def _loggers(args: argparse.Namespace, token: str, seed: int) -> list[BaseLogger]:
    """Avalanche's CSV / TensorBoard loggers under ``<out>/logs/<token>-seed<k>`` when asked."""
    folder = Path(args.out) / "logs" / f"{token.replace(':', '_').replace('+', '_')}-seed{seed}"
    loggers: list[BaseLogger] = []
    if "csv" in args.loggers:
        loggers.append(CSVLogger(log_folder=str(folder / "csv")))
    if "tensorboard" in args.loggers:
        from avalanche.logging import TensorboardLogger

        loggers.append(TensorboardLogger(tb_log_dir=folder / "tensorboard"))
    return loggers


def run_one(token: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Train ``token`` on the benchmark with ``seed``; the stream accuracy, forgetting and the
    accuracy on every test experience after every experience (Avalanche's metrics).

    ``train_seconds`` is wall time around ``strategy.train`` (all plugin work included, e.g. the
    re-basin phase after each experience), not Avalanche's epoch timer, which would miss it."""
    bench = BENCHMARKS[args.benchmark].build(args, seed)
    loggers = _loggers(args, token, seed)
    metrics = [
        accuracy_metrics(experience=True, stream=True),
        forgetting_metrics(experience=True, stream=True),
    ]
    evaluator = EvaluationPlugin(*metrics, loggers=loggers)
    strategy = build(token, args, seed, evaluator)
    joint = isinstance(strategy, JointTraining)
    steps = [bench.train_stream] if joint else list(bench.train_stream)
    progress = EpochProgress(len(steps) * args.epochs, f"{token} seed {seed}")
    strategy.plugins.append(progress)
    rows, train_seconds, start = [], 0.0, time.perf_counter()
    try:
        for step in steps:
            t = time.perf_counter()
            strategy.train(step, num_workers=args.workers)
            train_seconds += time.perf_counter() - t
            after = len(bench.train_stream) - 1 if joint else step.current_experience
            rows.append(_row(after, strategy.eval(bench.test_stream, num_workers=args.workers), joint))
    finally:
        progress.close()
        for logger in loggers:
            getattr(logger, "close", lambda: None)()
    record = {
        "strategy": token,
        "seed": seed,
        "final_acc": rows[-1]["acc"],
        "final_forgetting": rows[-1]["forgetting"],
        "model": args.model,
        "wall_seconds": time.perf_counter() - start,
        "train_seconds": train_seconds,
        "train_seconds_per_exp": train_seconds / len(bench.train_stream),
        "history": rows,
        "provenance": provenance(args),
    }
    for plugin in strategy.plugins:  # the strategies' own and the plugins on DER++ / ER-ACE
        if isinstance(plugin, RebasinPlugin):
            record["rebasin_reports"] = [asdict(r) for r in plugin.reports]
        if isinstance(plugin, WeightInterpolationPlugin):
            record["interpolation_reports"] = [asdict(r) for r in plugin.reports]
    return record

"""A sweep over (seed, strategy): skip what is already in ``--out``, save after every run."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from . import runner
from .reporting import write_outputs

__all__ = ["merged", "run_all", "save", "tune_ewc"]

Record = dict[str, Any]


def _key(record: Record) -> tuple[str, int]:
    return record["strategy"], record["seed"]


def merged(old: list[Record], new: list[Record]) -> list[Record]:
    """``old`` without the runs ``new`` replaces, then ``new``."""
    fresh = {_key(r) for r in new}
    return [r for r in old if _key(r) not in fresh] + new


def args_json(args: argparse.Namespace) -> dict[str, str]:
    return {k: str(v) for k, v in vars(args).items()}


def save(records: list[Record], args: argparse.Namespace) -> None:
    write_outputs(records, args_json(args), args.strategies, Path(args.out), args.benchmark)


def run_all(args: argparse.Namespace, previous: list[Record]) -> list[Record]:
    """Run every (seed, strategy) not in ``previous`` (same settings, checked by the caller),
    writing the results folder after each run so an interruption loses at most one run."""
    done = {_key(r) for r in previous}
    todo = [(seed, token) for seed in args.seeds for token in args.strategies if (token, seed) not in done]
    skipped = len(args.seeds) * len(args.strategies) - len(todo)
    if skipped:
        print(
            f"{skipped} (strategy, seed) run(s) already in {args.out} with these settings: skipped",
            flush=True,
        )
    records = list(previous)
    for k, (seed, token) in enumerate(todo, 1):
        print(f"[{k}/{len(todo)}] {token} seed {seed}", flush=True)
        record = runner.run_one(token, args, seed)
        records = merged(records, [record])
        print(
            f"{token:>24} seed {seed}: accuracy {100 * record['final_acc']:.2f}%  forgetting "
            f"{record['final_forgetting']:.3f}  train {record['train_seconds_per_exp']:.2f} s/exp",
            flush=True,
        )
        save(records, args)
    if not todo and (previous or args.overwrite):
        save(records, args)  # tables and plots in the current format
    return records


def tune_ewc(args: argparse.Namespace) -> None:
    """Grid over ewc-tuned's lambda on the validation split (first seed); writes ewc_tuning.json."""
    args = argparse.Namespace(**{**vars(args), "validation": True})
    from .benchmarks import BENCHMARKS

    BENCHMARKS[args.benchmark].problem(args)  # prepares the validation copy where needed
    trials = []
    for lam in args.tune_ewc:
        record = runner.run_one(f"ewc-tuned+ewc_lambda={lam!r}", args, seed=args.seeds[0])
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
    payload = {"trials": trials, "best_lambda": best["lambda"], "args": args_json(args)}
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, out / "ewc_tuning.json")
    print(f"best lambda on validation: {best['lambda']:g} (written to {out}/ewc_tuning.json)")

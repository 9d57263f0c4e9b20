"""A sweep over (seed, strategy): skip what is already in ``--out``, save after every run, merging
with what other sweeps saved there meanwhile."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import results_folder, runner
from .reporting import write_files

__all__ = ["Destination", "Discarded", "FolderTaken", "merged", "run_all", "tune_ewc"]

Record = dict[str, Any]


def _key(record: Record) -> tuple[str, int]:
    return record["strategy"], record["seed"]


def merged(old: list[Record], new: list[Record]) -> list[Record]:
    """``old`` without the runs ``new`` replaces, then ``new``."""
    fresh = {_key(r) for r in new}
    return [r for r in old if _key(r) not in fresh] + new


def args_json(args: argparse.Namespace) -> dict[str, str]:
    return {k: str(v) for k, v in vars(args).items()}


def _canonical(record: Record) -> str:
    return json.dumps(record, sort_keys=True)


class FolderTaken(Exception):
    """``--out`` now holds runs this sweep may not merge with; its own runs were written beside it."""


@dataclass(frozen=True)
class Discarded:
    """What ``--overwrite`` replaces: the folder's runs.json as the sweep found it (not the runs
    another sweep adds later)."""

    text: str | None = None
    runs: frozenset[str] = frozenset()

    @classmethod
    def found_in(cls, runs_file: Path) -> Discarded:
        text = runs_file.read_text()
        try:
            runs = results_folder.parse(text, runs_file).runs
        except results_folder.FolderError:
            runs = []  # unreadable: replaced whole (its text is matched)
        return cls(text, frozenset(map(_canonical, runs)))


@dataclass
class Destination:
    """The results folder a sweep saves into. ``differences`` names the settings of a saved
    runs.json's ``args`` that differ from this sweep's (None when they agree)."""

    args: argparse.Namespace
    differences: Callable[[dict[str, Any]], str | None]
    discarded: Discarded = field(default_factory=Discarded)

    def save(self, own: list[Record]) -> list[Record]:
        """Under the folder's lock, merge ``own`` (the runs this sweep made or brought; they replace
        the folder's runs of the same strategy and seed) into the runs the folder holds now and
        write it; return them. If the folder now holds runs of other settings, write ``own`` into
        a new folder beside it and raise :class:`FolderTaken`."""
        out = Path(self.args.out)
        with results_folder.locked(out):
            results_folder.tidy(out)
            problem, kept = self._kept(out / results_folder.RUNS_FILE)
            if problem is None:
                records = merged(kept, own)
                self._write(out, records)
                return records
        changed = f"{out} {problem}, saved since this sweep started (by another sweep?)"
        if not own:
            raise FolderTaken(f"{changed}; left as it is (this call had no run of its own to save)")
        elsewhere = results_folder.beside(out)
        with results_folder.locked(elsewhere):
            self._write(elsewhere, own)
        raise FolderTaken(
            f"{changed}; stopped: this sweep's {len(own)} finished run(s) are in {elsewhere} instead (merge "
            f"them into a folder of these settings with --merge {elsewhere}, or rerun into another --out)"
        )

    def _kept(self, runs_file: Path) -> tuple[str | None, list[Record]]:
        """The folder's runs a save keeps, or why it may not write there."""
        if not runs_file.exists():
            return None, []
        text = runs_file.read_text()
        if text == self.discarded.text:
            return None, []
        try:
            saved = results_folder.parse(text, runs_file)
        except results_folder.FolderError as err:
            return f"has a runs.json this program cannot use ({err})", []
        kept = [r for r in saved.runs if _canonical(r) not in self.discarded.runs]
        differences = self.differences(saved.args) if kept else None
        if differences:
            return f"now holds runs made with other settings ({differences})", kept
        return None, kept

    def _write(self, folder: Path, records: list[Record]) -> None:
        def write_into(staging: Path) -> None:
            write_files(records, args_json(self.args), self.args.strategies, staging, self.args.benchmark)

        results_folder.write(folder, write_into)


def run_all(args: argparse.Namespace, previous: list[Record], destination: Destination) -> list[Record]:
    """Run every (seed, strategy) not in ``previous`` (same settings, checked by the caller),
    saving into ``destination`` after each run so an interruption loses at most one run; the runs
    the folder holds at the end."""
    done = {_key(r) for r in previous}
    todo = [(seed, token) for seed in args.seeds for token in args.strategies if (token, seed) not in done]
    skipped = len(args.seeds) * len(args.strategies) - len(todo)
    if skipped:
        print(
            f"{skipped} (strategy, seed) run(s) already in {args.out} with these settings: skipped",
            flush=True,
        )
    records, own = list(previous), []
    for k, (seed, token) in enumerate(todo, 1):
        print(f"[{k}/{len(todo)}] {token} seed {seed}", flush=True)
        record = runner.run_one(token, args, seed)
        own = merged(own, [record])
        print(
            f"{token:>24} seed {seed}: accuracy {100 * record['final_acc']:.2f}%  forgetting "
            f"{record['final_forgetting']:.3f}  train {record['train_seconds_per_exp']:.2f} s/exp",
            flush=True,
        )
        records = destination.save(own)
    if not todo:
        records = destination.save([])  # tables and plots in the current format
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

"""Continual-learning comparison: Re-basin against Avalanche's baselines.

    avalanche-rebasin-compare --quick                      # a few minutes, offline
    avalanche-rebasin-compare --seeds 0 1 2                # the full 20-experience table
    avalanche-rebasin-compare --strategies replay+mem_size=2000 rebasin:midpoint \\
        "rebasin-nopermute:consistent+delta_lr=3e-3" --validation

(``python -m avalanche_rebasin_experiments`` and ``python benchmarks/continual.py`` are the
same program.) A strategy is ``NAME[:PRESET][+key=value...]``: the ``rebasin`` family takes a
preset from ``avalanche_rebasin.PRESETS`` (default ``paper``) and any ``RebasinStrategy``
setting; the baselines take their own (``replay+mem_size=2000``, ``ewc-tuned+ewc_lambda=100``).
Avalanche's strong baselines run only when named (``der``, ``er-ace``, ``er-aml``, ``gdumb``,
``gem``, ``icarl``, ``si``, ``mas``: ``der+alpha=0.2+beta=0.5``); the memory-based ones share
replay's memory size. ``interp-der``, ``interp-er-ace``, ``rebasin-der`` and ``rebasin-er-ace``
put our plugins on DER++ and ER-ACE, reading the template's memory (DER's own α and β are
``der_alpha`` and ``der_beta`` there: ``interp-der+alpha=0.3+der_alpha=0.2``).
The whole string labels the run. Every strategy is evaluated on the whole test stream after
every experience with Avalanche's evaluators; ``--validation`` evaluates on held-out training
images instead, on every benchmark. Writes to ``--out``: ``summary.md``, ``runs.json`` (every
metric after every experience, Re-basin's diagnostics, library versions, git commit and
arguments of each run), ``metrics.csv`` and PNG plots. Rerunning a sweep into the same
``--out`` with the same settings skips the (strategy, seed) runs already there; other
settings are refused (``--overwrite`` discards them). Every argument and strategy token, the
folder (writable, its runs.json readable) are checked before anything runs. Sweeps into one
``--out`` at the same time keep each other's runs: each save takes the lock ``OUT/.lock`` and
merges with what the folder holds then; files are staged in ``OUT/.writing-*``, then moved in.
Ctrl-C stops a sweep with exit status 130, keeping the finished runs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NoReturn

import torch

from . import results_folder, sweep
from .benchmarks import BENCHMARKS
from .reporting import summarize
from .strategies import MODELS, OPTIMIZERS, STRATEGIES, build

__all__ = ["main", "make_parser"]

DEFAULT_STRATEGIES = [
    *(name for name, entry in STRATEGIES.items() if entry.swept_by_default and name != "joint"),
    "rebasin:midpoint",
    "rebasin:consistent",
    "joint",
]
# The arguments that define an experiment: runs that differ in any of them are never combined.
SETTINGS = (
    "benchmark", "model", "epochs", "experiences", "validation", "full_mnist", "ewc_tuned_lambda",
    "lr", "batch_size", "mem_size", "optimizer",
)  # fmt: skip
# Chosen by `--tune-ewc 1 10 100 1000 10000` on the validation split of Rotated MNIST.
EWC_TUNED_LAMBDA = 1000.0
# One compute thread: on the embedded benchmarks it was as fast as two on an idle 2-core machine
# and far faster under load (two threads fight other processes for the cores).
DEFAULT_THREADS = 1


def _number(kind: type, low: float, rule: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}") from None
        if not (low <= value < math.inf) or (kind is int and value > 2**32 - 1):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        return value

    return parse


POSITIVE = _number(int, 1, "an integer >= 1")
SEED = _number(int, 0, "an integer in [0, 2**32 - 1] (NumPy seeds the benchmark with it)")
NON_NEGATIVE = _number(float, 0, "a finite number >= 0")
POSITIVE_FLOAT = _number(float, 1e-300, "a finite number > 0")
WORKERS = _number(int, 0, "an integer >= 0")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="avalanche-rebasin-compare", description=__doc__.splitlines()[0])
    p.add_argument("--benchmark", choices=list(BENCHMARKS), default="rotated-mnist")
    p.add_argument(
        "--strategies", nargs="+", default=DEFAULT_STRATEGIES, metavar="NAME[:PRESET][+key=value]",
        help=f"from {list(STRATEGIES)} (default: {' '.join(DEFAULT_STRATEGIES)}); every token is checked "
        "before anything runs",
    )  # fmt: skip
    p.add_argument("--model", choices=list(MODELS), default=None, help="default mlp1 (slimresnet18 on CIFAR)")
    p.add_argument("--seeds", nargs="+", type=SEED, default=[0], help="distinct integers >= 0")
    p.add_argument("--epochs", type=POSITIVE, default=5, help="epochs per experience (>= 1)")
    p.add_argument(
        "--experiences", type=POSITIVE, default=None,
        help="default: 20 on rotated-* and split-cifar100, 5 on split-(fashion-)mnist, 10 otherwise; "
        "5 with --quick",
    )  # fmt: skip
    p.add_argument(
        "--lr", type=POSITIVE_FLOAT, default=1e-3, help="learning rate of every strategy's optimiser"
    )
    p.add_argument(
        "--batch-size", type=POSITIVE, default=500, help="training mini-batch (published EWC keeps 10)"
    )
    p.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adamw")
    p.add_argument(
        "--mem-size", type=POSITIVE, default=None,
        help="the memory of replay, rebasin, interp, A-GEM, der, er-ace, er-aml, gdumb, gem and icarl "
        "(and of our methods on der / er-ace), in total; default 5 images per class per experience",
    )  # fmt: skip
    p.add_argument("--workers", type=WORKERS, default=0, help="DataLoader worker processes")
    p.add_argument("--threads", type=POSITIVE, default=DEFAULT_THREADS, help="torch compute threads")
    p.add_argument(
        "--loggers",
        nargs="*",
        choices=["csv", "tensorboard"],
        default=[],
        help="Avalanche loggers into OUT/logs",
    )
    p.add_argument("--ewc-tuned-lambda", type=NON_NEGATIVE, default=EWC_TUNED_LAMBDA)
    p.add_argument(
        "--tune-ewc", nargs="+", type=NON_NEGATIVE, metavar="LAMBDA",
        help="choose ewc-tuned's lambda on the validation split (never the test set)",
    )  # fmt: skip
    p.add_argument(
        "--merge", nargs="+", metavar="DIR",
        help="add the runs in DIR/runs.json to --out and rewrite its tables and plots (runs nothing); "
        f"they must have this call's {', '.join(SETTINGS)}",
    )  # fmt: skip
    p.add_argument(
        "--validation", action="store_true", help="evaluate on held-out training images, never the test set"
    )
    p.add_argument(
        "--quick", action="store_true", help="5 experiences, 1 epoch, the first seed: a few minutes"
    )
    p.add_argument("--full-mnist", action="store_true", help="download full MNIST through Avalanche (online)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--cache", default=".cache")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="results folder (default results/BENCHMARK[-MODEL][-quick])")
    p.add_argument("--overwrite", action="store_true", help="discard the runs already in --out")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before anything runs or is written, what would fail or mislead later."""
    for option, values in (("--seeds", args.seeds), ("--strategies", args.strategies)):
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            p.error(f"{option} lists {', '.join(repeated)} more than once; give each once")
    entry = BENCHMARKS[args.benchmark]
    cifar = args.benchmark == "split-cifar100"
    if cifar != (args.model == "slimresnet18"):
        p.error(
            f"--model {args.model}: {args.benchmark} needs "
            f"{'slimresnet18' if cifar else 'a 28×28 model (mlp1, mlp2, mlp3, cnn)'}"
        )
    if args.full_mnist and "mnist" not in args.benchmark.replace("fashion-mnist", ""):
        p.error(f"--full-mnist applies to the MNIST benchmarks, not {args.benchmark}")
    if entry.divides and entry.divides % args.experiences:
        divisors = [d for d in range(1, entry.divides + 1) if entry.divides % d == 0]
        p.error(
            f"--experiences {args.experiences}: {args.benchmark} needs a divisor of {entry.divides}, "
            f"one of {divisors}"
        )
    if args.mem_size is not None and args.mem_size < args.experiences:
        p.error(f"--mem-size {args.mem_size}: give at least one slot per experience ({args.experiences})")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        p.error(f"--device {args.device!r} is not a torch device ({err}); use e.g. cpu or cuda:0")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    check_strategies(p, args)
    problem = None if args.merge else entry.problem(args)
    if problem:
        p.error(problem)


def check_strategies(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Parse every token and build its strategy (untrained, on the CPU): a bad override fails here."""
    from avalanche.training.plugins import EvaluationPlugin

    trial = argparse.Namespace(**{**vars(args), "device": "cpu"})
    for token in args.strategies:
        try:
            build(token, trial, 0, EvaluationPlugin(loggers=[]))
        except (ValueError, TypeError) as err:
            p.error(f"--strategies {token!r}: {err}")


def recorded_settings(p: argparse.ArgumentParser, recorded: dict[str, Any]) -> dict[str, str]:
    """The :data:`SETTINGS` in a runs.json's ``args`` (the defaults for files older than a setting)."""
    defaults = {k: str(p.get_default(k)) for k in SETTINGS}
    defaults["model"] = "slimresnet18" if recorded.get("benchmark") == "split-cifar100" else "mlp1"
    return {k: str(recorded.get(k, defaults[k])) for k in SETTINGS}


def setting_differences(
    p: argparse.ArgumentParser, args: argparse.Namespace
) -> Callable[[dict[str, Any]], str | None]:
    """For a runs.json's ``args``: the settings in which it differs from this call ("epochs 1
    there, 5 now; ..."), or None."""
    ours = {k: str(getattr(args, k)) for k in SETTINGS}

    def differences(recorded: dict[str, Any]) -> str | None:
        theirs = recorded_settings(p, recorded)
        diff = [f"{k} {theirs[k]} there, {ours[k]} now" for k in SETTINGS if theirs[k] != ours[k]]
        return "; ".join(diff) or None

    return differences


def matching_runs(
    p: argparse.ArgumentParser, args: argparse.Namespace, path: Path, what: str, fix: str
) -> list:
    """The runs in ``path``, refused unless they were made with this invocation's settings."""
    try:
        saved = results_folder.read_saved(path)
    except results_folder.FolderError as err:
        p.error(f"{what}: {err}; {path.parent} is not a results folder of this program as it stands")
    diff = setting_differences(p, args)(saved.args)
    if diff:
        p.error(f"{what} holds runs made with other settings ({diff}); {fix}")
    return saved.runs


def check_out_writable(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse an ``--out`` that cannot be created or written in, before anything trains."""
    try:
        results_folder.check_writable(Path(args.out))
    except results_folder.FolderError as err:
        p.error(f"--out {args.out}: {err}")


def merge_inputs(p: argparse.ArgumentParser, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The runs of every ``--merge`` folder (later folders replace earlier ones' runs), checked."""
    fix = "pass the settings it was run with (see its runs.json) or merge it into another --out"
    incoming: list[dict[str, Any]] = []
    for d in args.merge:
        if not (Path(d) / "runs.json").is_file():
            p.error(f"--merge {d}: no runs.json there; pass the --out folder of an earlier run")
        incoming = sweep.merged(incoming, matching_runs(p, args, Path(d) / "runs.json", f"--merge {d}", fix))
    return incoming


def open_out(
    p: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], sweep.Destination]:
    """Under ``--out``'s lock: finish or remove what stopped saves left, then the runs already
    there (refused unless they have this call's settings) and what ``--overwrite`` discards."""
    out = Path(args.out)
    destination = sweep.Destination(args, setting_differences(p, args))
    if not out.is_dir():
        results_folder.tidy(out)  # the previous version's temporary folders beside it
        return [], destination
    with results_folder.locked(out):
        results_folder.tidy(out)
        runs_file = out / "runs.json"
        if not runs_file.exists():
            return [], destination
        if args.overwrite:
            destination.discarded = sweep.Discarded.found_in(runs_file)
            return [], destination
        fix = "averaging them would mix experiments: choose a new --out, delete the folder, or pass "
        fix += "--overwrite"
        return matching_runs(p, args, runs_file, f"--out {out}", fix), destination


def stop_interrupted(args: argparse.Namespace) -> NoReturn:
    """After Ctrl-C: one line saying what ``--out`` kept, exit status 130 (as a shell reports SIGINT)."""
    runs_file = Path(args.out) / "runs.json"
    try:
        kept = len(results_folder.read_saved(runs_file).runs)
    except results_folder.FolderError:
        kept = 0
    if args.tune_ewc:
        message = f"{Path(args.out) / 'ewc_tuning.json'} was not written; rerun the same command to tune"
    elif args.merge:
        message = f"{runs_file} holds {kept} run(s); rerun the same command to finish the merge"
    elif kept:
        message = (
            f"{kept} finished run(s) are in {runs_file}; rerun the same command to continue "
            "(finished runs are skipped)"
        )
    else:
        message = f"no finished run was saved in {args.out}; rerun the same command to start again"
    print(f"interrupted: {message}", file=sys.stderr, flush=True)
    raise SystemExit(130)


def resolve_defaults(args: argparse.Namespace) -> None:
    entry = BENCHMARKS[args.benchmark]
    if args.experiences is None:
        args.experiences = 5 if args.quick else entry.default_experiences
    if args.model is None:
        args.model = "slimresnet18" if args.benchmark == "split-cifar100" else "mlp1"
    if args.quick:
        args.epochs = 1
        args.seeds = args.seeds[:1]
    model = "" if args.model in ("mlp1", "slimresnet18") else f"-{args.model}"
    args.out = args.out or f"results/{args.benchmark}{model}{'-quick' if args.quick else ''}"


def quiet_third_party_warnings() -> None:
    """Hide Avalanche's own notices in this process (the harness), not in the library.

    Avalanche 0.6 warns about its deprecated internals (the replay plugin's ``update``) on every
    call, from a wrapper that first runs ``warnings.simplefilter("once", DeprecationWarning)``;
    that puts its filter ahead of any other, so the wrapper's module gets a ``warnings`` whose
    ``simplefilter`` does nothing, and the filter below applies. Not ours to fix; they broke up
    the progress bars."""
    import avalanche._annotations as annotations

    annotations.warnings = SimpleNamespace(warn=warnings.warn, simplefilter=lambda *args, **kwargs: None)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"avalanche(\.|$)")
    # The harness passes no loggers on purpose (it reads the metrics itself; --loggers adds them).
    warnings.filterwarnings("ignore", message="No loggers specified", category=UserWarning)
    # benchmark_with_validation_stream announces that it lists the stream (it is short).
    warnings.filterwarnings("ignore", message="stream generator will be converted", category=UserWarning)


def main(argv: list[str] | None = None) -> None:
    p = make_parser()
    args = p.parse_args(argv)
    resolve_defaults(args)
    try:
        run(p, args)
    except KeyboardInterrupt:
        stop_interrupted(args)


def run(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check everything, then tune, merge or sweep (``main`` without its Ctrl-C handling)."""
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # for worker processes started later
    quiet_third_party_warnings()
    check_args(p, args)
    check_out_writable(p, args)
    if args.tune_ewc:
        sweep.tune_ewc(args)
        return
    incoming = merge_inputs(p, args) if args.merge else []
    previous, destination = open_out(p, args)
    try:
        if args.merge:
            records = destination.save(incoming)
            print(summarize(records, args.strategies))
            return
        records = sweep.run_all(args, previous, destination)
    except sweep.FolderTaken as err:
        p.exit(1, f"{p.prog}: error: {err}\n")
    print("\n" + summarize(records, args.strategies), f"\n\nwritten to {args.out}/", sep="")


if __name__ == "__main__":
    sys.exit(main())

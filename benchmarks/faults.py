"""Fault drill: inject the faults of docs/faults.md into real sweeps of the comparison harness
and check what holds.

    python benchmarks/faults.py                      # every drill -> results/faults/
    python benchmarks/faults.py --only ctrl-c kill-between-moves

Each drill runs `benchmarks/continual.py --experiences 3 --epochs 1` (naive, replay, LwF,
A-GEM: seconds each) in a scratch folder, one thread per process, and records whether its
check held. Writes ``faults.json`` and ``faults.md`` (one row per drill: held, what was
seen, seconds). Exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HARNESS = [sys.executable, str(ROOT / "benchmarks" / "continual.py"), "--experiences", "3", "--epochs", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
# Kills the process between the file moves of its second save (what a SIGKILL there leaves).
KILL_BETWEEN_MOVES = """
import os, sys
from avalanche_rebasin_experiments import cli
moves, real = [], os.replace
def replace(a, b):
    if os.path.basename(b) == "runs.json":
        moves.append(b)
        if len(moves) == 2:
            os._exit(9)
    return real(a, b)
os.replace = replace
cli.main(sys.argv[1:])
"""


class Drill:
    """One fault: ``run(folder) -> (held, what was seen)``."""

    def __init__(self, name: str, fault: str, run: Callable[[Path, list[str]], tuple[bool, str]]) -> None:
        self.name, self.fault, self.run = name, fault, run


def _default_sigint() -> None:
    """Python turns SIGINT into KeyboardInterrupt only if it was not ignored at start (a shell
    ignores it for background jobs, and children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _sweep(folder: Path, cache: list[str], *argv: str, **popen) -> subprocess.Popen:
    command = [*HARNESS, *cache, *argv]
    return subprocess.Popen(command, cwd=folder, env=ENV, text=True, preexec_fn=_default_sigint, **popen)


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    out, err = process.communicate(timeout=600)
    return process.returncode, (out or "") + (err or "")


def _run(folder: Path, cache: list[str], *argv: str) -> tuple[int, str]:
    return _finish(_sweep(folder, cache, *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE))


def _interrupt(folder: Path, cache: list[str], argv: list[str], marker: str, delay: float, sig: int):
    """Run a sweep, send it ``sig`` ``delay`` s after ``marker`` is in its output; (status, output)."""
    log = folder / f"sweep-{time.monotonic_ns()}.log"
    with open(log, "w") as sink:
        process = _sweep(folder, cache, *argv, stdout=sink, stderr=subprocess.STDOUT)
        while marker not in log.read_text() and process.poll() is None:
            time.sleep(0.005)
        time.sleep(delay)
        process.send_signal(sig)
        code = process.wait(timeout=120)
    return code, log.read_text()


def _runs(out: Path) -> list[tuple[str, int]]:
    return sorted((r["strategy"], r["seed"]) for r in json.loads((out / "runs.json").read_text())["runs"])


def _csv_runs(out: Path) -> list[tuple[str, int]]:
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    return sorted({(row.split(",")[0], int(row.split(",")[1])) for row in rows})


def _last_line(text: str) -> str:
    return next((line for line in reversed(text.strip().splitlines()) if line.strip()), "")


def _hidden(out: Path) -> list[str]:
    return sorted(f.name for f in out.iterdir() if f.name.startswith(".") and f.name != ".lock")


def concurrent_sweeps(folder: Path, cache: list[str]) -> tuple[bool, str]:
    first = _sweep(folder, cache, "--seeds", "0", "1", "--strategies", "naive", "replay", "--out", "X",
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    second = _run(folder, cache, "--seeds", "0", "1", "--strategies", "lwf", "agem", "--out", "X")
    first_done = _finish(first)
    runs = _runs(folder / "X")
    held = first_done[0] == second[0] == 0 and len(runs) == 8 and _csv_runs(folder / "X") == runs
    failed = [_last_line(text) for code, text in (first_done, second) if code]
    return held, f"exit {first_done[0]} and {second[0]}; runs.json holds {len(runs)} of 8 runs" + "".join(
        f"; {line}" for line in failed
    )


def other_settings(folder: Path, cache: list[str]) -> tuple[bool, str]:
    first = _sweep(folder, cache, "--seeds", "0", "--strategies", "naive", "--out", "Y",
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    second = _run(folder, cache, "--seeds", "0", "1", "--epochs", "2", "--strategies", "naive", "--out", "Y")
    first_done = _finish(first)
    conflicts = sorted(folder.glob("Y.conflict-*"))
    codes = sorted([first_done[0], second[0]])
    finished = sum(text.count(": accuracy ") for text in (first_done[1], second[1]))
    kept = sum(len(_runs(c)) for c in conflicts) + len(_runs(folder / "Y"))
    held = codes == [0, 1] and len(conflicts) == 1 and kept == finished
    seen = f"exit codes {codes}; {len(conflicts)} conflict folder(s); {kept} of {finished} finished runs kept"
    return held, seen


def out_below_a_file(folder: Path, cache: list[str]) -> tuple[bool, str]:
    (folder / "F").write_text("a file")
    code, text = _run(folder, cache, "--strategies", "naive", "--out", "F/sub/out")
    return code == 2 and "is a file" in text and (folder / "F").is_file(), _last_line(text)


def read_only_folder(folder: Path, cache: list[str]) -> tuple[bool, str]:
    if os.geteuid() == 0:
        return True, "not checkable as root (root writes anywhere); the test suite fakes the error instead"
    (folder / "ro").mkdir()
    (folder / "ro").chmod(0o500)
    code, text = _run(folder, cache, "--strategies", "naive", "--out", "ro/out")
    return code == 2 and not (folder / "ro" / "out").exists(), _last_line(text)


def wrong_shape(folder: Path, cache: list[str]) -> tuple[bool, str]:
    (folder / "W").mkdir()
    saved = '{"args": [], "runs": []}'
    (folder / "W" / "runs.json").write_text(saved)
    start = time.perf_counter()
    code, text = _run(folder, cache, "--strategies", "naive", "--out", "W")
    unchanged = (folder / "W" / "runs.json").read_text() == saved
    seconds = time.perf_counter() - start
    return code == 2 and unchanged, f"{_last_line(text)} ({seconds:.1f} s, nothing trained)"


def kill_after_a_run(folder: Path, cache: list[str]) -> tuple[bool, str]:
    argv = ["--seeds", "0", "1", "--strategies", "naive", "--out", "K"]
    _interrupt(folder, cache, argv, "seed 1: accuracy", 0.0, signal.SIGKILL)
    beside = sorted(f.name for f in folder.iterdir() if f.name.startswith(".K"))
    code, text = _run(folder, cache, *argv)
    consistent = _runs(folder / "K") == _csv_runs(folder / "K") == [("naive", 0), ("naive", 1)]
    held = code == 0 and not beside and consistent and not _hidden(folder / "K")
    notice = next((line for line in text.splitlines() if ".writing" in line), "no leftover to clean")
    return held, f"nothing beside --out; rerun: {notice.strip()}"


def kill_between_moves(folder: Path, cache: list[str]) -> tuple[bool, str]:
    script = folder / "kill_between_moves.py"
    script.write_text(KILL_BETWEEN_MOVES)
    argv = [*HARNESS[2:], *cache, "--seeds", "0", "1", "--strategies", "naive", "--out", "KM"]
    killed = subprocess.run([sys.executable, str(script), *argv], cwd=folder, env=ENV, capture_output=True)
    code, text = _run(folder, cache, "--seeds", "0", "1", "--strategies", "naive", "--out", "KM")
    consistent = _runs(folder / "KM") == _csv_runs(folder / "KM") == [("naive", 0), ("naive", 1)]
    held = killed.returncode == 9 and code == 0 and consistent and "skipped" in text
    notice = next((line for line in text.splitlines() if "finished the save" in line), "no notice")
    return held, f"killed with status {killed.returncode}; rerun: {notice.strip()}; no run retrained"


def old_temporary_folder(folder: Path, cache: list[str]) -> tuple[bool, str]:
    (folder / "OLD" / ".res.ab12cd34").mkdir(parents=True)
    (folder / "OLD" / ".res.ab12cd34" / "metrics.csv").write_text("x")
    code, text = _run(folder, cache, "--strategies", "naive", "--out", "OLD/res")
    notice = next((line for line in text.splitlines() if "ab12cd34" in line), "no notice")
    return code == 0 and not (folder / "OLD" / ".res.ab12cd34").exists(), notice.strip()


def ctrl_c(folder: Path, cache: list[str]) -> tuple[bool, str]:
    argv = ["--seeds", "0", "1", "2", "--strategies", "naive", "replay", "--out", "Z"]
    code, text = _interrupt(folder, cache, argv, "[2/6]", 0.2, signal.SIGINT)
    last = _last_line(text)
    held = code == 130 and last.startswith("interrupted:") and not _hidden(folder / "Z")
    return held, f"status {code}; last line: {last}"


def cold_cache(folder: Path, cache: list[str]) -> tuple[bool, str]:
    own = ["--cache", str(folder / "cold-cache")]
    first = _sweep(folder, own, "--strategies", "naive", "--out", "C1", stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE)  # fmt: skip
    second = _run(folder, own, "--strategies", "naive", "--out", "C2")
    first_done = _finish(first)
    return first_done[0] == second[0] == 0, f"exit {first_done[0]} and {second[0]} on one empty --cache"


def kill_mid_run_then_resume(folder: Path, cache: list[str]) -> tuple[bool, str]:
    argv = ["--seeds", "0", "1", "--strategies", "naive", "replay"]
    _run(folder, cache, *argv, "--out", "U")
    _interrupt(folder, cache, [*argv, "--out", "R"], "[3/4]", 1.0, signal.SIGKILL)
    _run(folder, cache, *argv, "--out", "R")

    def results(out: str) -> list:
        runs = json.loads((folder / out / "runs.json").read_text())["runs"]
        return sorted((r["strategy"], r["seed"], r["final_acc"], json.dumps(r["history"])) for r in runs)

    same = results("U") == results("R")
    return same, "accuracies and histories equal to the uninterrupted sweep" if same else "they differ"


def deleted_metrics(folder: Path, cache: list[str]) -> tuple[bool, str]:
    _run(folder, cache, "--strategies", "naive", "--out", "D")
    before = (folder / "D" / "metrics.csv").read_bytes()
    (folder / "D" / "metrics.csv").unlink()
    _run(folder, cache, "--strategies", "naive", "--out", "D")
    same = (folder / "D" / "metrics.csv").read_bytes() == before
    return same, "regenerated byte-identical" if same else "regenerated differently"


DRILLS = [
    Drill("concurrent-sweeps", "two sweeps into one --out", concurrent_sweeps),
    Drill("other-settings", "two sweeps with other settings into one empty --out", other_settings),
    Drill("out-below-a-file", "--out below a path that is a file", out_below_a_file),
    Drill("read-only", "--out in a read-only folder", read_only_folder),
    Drill("wrong-shape", "a runs.json of the wrong shape", wrong_shape),
    Drill("kill-after-a-run", "SIGKILL just after a run's line", kill_after_a_run),
    Drill("kill-between-moves", "SIGKILL between the file moves of a save", kill_between_moves),
    Drill("old-temporary-folder", "a temporary folder an earlier version left", old_temporary_folder),
    Drill("ctrl-c", "Ctrl-C (SIGINT) during the second of six runs", ctrl_c),
    Drill("cold-cache", "two sweeps preparing one empty --cache", cold_cache),
    Drill("kill-mid-run", "SIGKILL mid-run, then the same command", kill_mid_run_then_resume),
    Drill("deleted-metrics", "metrics.csv deleted, then the same command", deleted_metrics),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=[d.name for d in DRILLS], help="run these drills only")
    p.add_argument("--out", default=str(ROOT / "results" / "faults"))
    args = p.parse_args(argv)
    cache = ["--cache", str(ROOT / ".cache")]
    rows = []
    for drill in [d for d in DRILLS if not args.only or d.name in args.only]:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"drill-{drill.name}-") as scratch:
            held, seen = drill.run(Path(scratch), cache)
        rows.append({"drill": drill.name, "fault": drill.fault, "held": held, "seen": seen,
                     "seconds": round(time.perf_counter() - start, 1)})  # fmt: skip
        print(f"{'held' if held else 'FAILED':>6}  {drill.name}: {seen}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "faults.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| drill | fault injected | held | what was seen | s |", "|---|---|---|---|---|"]
    for r in rows:
        held = "yes" if r["held"] else "**no**"
        lines.append(f"| `{r['drill']}` | {r['fault']} | {held} | {r['seen']} | {r['seconds']} |")
    (out / "faults.md").write_text("\n".join(lines) + "\n")
    print(f"written to {out}/")
    return 0 if all(r["held"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

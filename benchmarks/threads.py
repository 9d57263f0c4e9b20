"""How many compute threads should the comparison use? 1 against 2, measured on the demo.

    python benchmarks/threads.py                 # -> results/speed/threads.{md,json}
    python benchmarks/threads.py --repeats 3 --label idle

Runs the quick comparison (embedded Rotated MNIST, 3 experiences, Naive and Re-basin
``midpoint``) in a fresh process per setting, alternating 1 and 2 threads, and reports the
median wall time of each. ``--label`` names the machine state (idle, loaded) in the table;
rows from earlier calls with other labels are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import markdown_table, write_json

ROOT = Path(__file__).resolve().parents[1]
COMMAND = ["-m", "avalanche_rebasin_experiments", "--quick", "--experiences", "3"]
COMMAND += ["--strategies", "naive", "rebasin:midpoint"]


def one_run(threads: int, cache: Path) -> float:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        start = time.perf_counter()
        argv = [sys.executable, *COMMAND, "--threads", str(threads), "--out", out, "--cache", str(cache)]
        subprocess.run(argv, check=True, capture_output=True, env=env, cwd=ROOT)
        return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--label", default="as found", help="the machine's state while measuring (idle, loaded)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "speed")
    args = p.parse_args()
    times: dict[int, list[float]] = {1: [], 2: []}
    cache = ROOT / ".cache"
    for r in range(args.repeats):
        for threads in (1, 2) if r % 2 == 0 else (2, 1):
            times[threads].append(one_run(threads, cache))
            seconds = times[threads][-1]
            print(f"repeat {r + 1}/{args.repeats}, {threads} thread(s): {seconds:.1f} s", flush=True)
    path = args.out / "threads.json"
    earlier = json.loads(path.read_text()) if path.exists() else []
    rows = [row for row in earlier if row["label"] != args.label]
    rows.append(
        {
            "label": args.label,
            "cpus": os.cpu_count(),
            "seconds": {str(k): v for k, v in times.items()},
            "median": {str(k): statistics.median(v) for k, v in times.items()},
        }
    )
    write_json(path, rows)
    header = ["machine", "CPUs", "1 thread, median s", "2 threads, median s", "runs each"]
    table = [
        [r["label"], r["cpus"], f"{r['median']['1']:.1f}", f"{r['median']['2']:.1f}", len(r["seconds"]["1"])]
        for r in rows
    ]
    (args.out / "threads.md").write_text(
        "Quick comparison (embedded Rotated MNIST, 3 experiences, naive + rebasin:midpoint), wall time "
        "of the whole process.\n\n" + markdown_table(header, table) + "\n"
    )
    print(markdown_table(header, table))


if __name__ == "__main__":
    main()

"""Speed against the two PyTorch re-basin packages users could pick instead.

    python benchmarks/peers.py                          # all five tasks
    python benchmarks/peers.py --quick                  # the three small MLPs, once
    python benchmarks/peers.py --tasks resnet18-224 --repeats 2

Peers: the paper authors' ``sinkhorn-rebasin`` (Sinkhorn re-basin, the method of ``align``)
and snimu's ``rebasin`` (``PermutationCoordinateDescent``: weight matching, like
``weight_matching``). Both import as ``rebasin``, so each gets its own venv,
``.cache/peers/<name>/venv``, made here on first use; a .pth file there puts this venv's
site-packages behind its own, so every method runs on the same torch build.

Each task: model A from a seed, B = a random permutation of A (``random_permutation`` on the
discovered spec); each run is a fresh subprocess (``peers_worker.py``) that must map B back
onto A exactly (every parameter equal). Methods alternate within a repeat; medians are
reported. OMP_NUM_THREADS=MKL_NUM_THREADS=1 in every process.
"""

from __future__ import annotations

import os

os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # before torch is imported

import argparse
import atexit
import json
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

import torch
from common import markdown_table, write_json
from peers_worker import AUTHORS_MAX_STEPS, TASKS

from avalanche_rebasin import discover_spec, permute, random_permutation

HERE = Path(__file__).resolve().parent
PEERS = {"authors": "sinkhorn-rebasin==0.0.2", "snimu": "rebasin==0.0.47"}
# what each peer needs beyond this venv's packages (torch, numpy, scipy, tqdm, matplotlib)
OFFLINE_DEPENDENCIES = {"authors": [], "snimu": ["graphviz", "torchview", "torchviz"]}
# method → (peer venv, or None for this venv; the method its time is compared with)
METHODS = {
    "ours-align": (None, "authors"),
    "ours-sinkhorn": (None, "authors"),
    "authors": ("authors", "authors"),
    "ours-wm": (None, "snimu"),
    "snimu": ("snimu", "snimu"),
}
BIG = {"resnet18-224", "mlp-784-512x4-10"}
WHEELS = (
    HERE.parent / ".cache" / "wheels"
)  # the peers' wheels, for a machine without an index  # 1 repeat unless --repeats


def peer_python(name: str) -> str:
    """The Python of the peer's venv, created (and the package installed) on first use."""
    venv = HERE.parent / ".cache" / "peers" / name / "venv"
    stamp, python = venv / ".installed", venv / "bin" / "python"
    if not stamp.exists() or stamp.read_text() != PEERS[name]:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        site = Path(sysconfig.get_paths(vars={"base": str(venv)})["purelib"])
        (site / "_shared_torch.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        # without an index (benchmarks/gpu_check.py --prepare fetched the wheels): no dependency resolution
        offline = ["--no-index", "--no-deps", "--find-links", str(WHEELS), *OFFLINE_DEPENDENCIES[name]]
        packages = [*(offline if WHEELS.exists() else []), PEERS[name]]
        subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True)
        stamp.write_text(PEERS[name])
    return str(python)


def prepare(task: str, seed: int, path: Path) -> None:
    """Write A, B (a random permutation of A) and the example input for the workers."""
    build, shape = TASKS[task]
    torch.manual_seed(seed)
    a = build().eval()
    x = torch.randn(shape)
    spec = discover_spec(a, x)
    b = permute(a, spec, random_permutation(spec, torch.Generator().manual_seed(seed)))
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    torch.save({"a": a.state_dict(), "b": b.state_dict(), "x": x}, path)


def run_one(method: str, task: str, seed: int, path: Path) -> dict[str, Any]:
    venv = METHODS[method][0]
    python = sys.executable if venv is None else peer_python(venv)
    cmd = [python, str(HERE / "peers_worker.py"), method, task, str(seed), str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return {"method": method, "task": task, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(lines[-1])


def summarize(task: str, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for method in METHODS:
        ok = [r for r in runs if r["method"] == method and "error" not in r]
        errors = [r["error"] for r in runs if r["method"] == method and "error" in r]

        def med(key: str, ok: list[dict[str, Any]] = ok) -> float | None:
            values = [r[key] for r in ok if r[key] is not None]
            return statistics.median(values) if values else None

        exact = sum(r["exact"] for r in ok)
        rows[method] = {
            "task": task,
            "method": method,
            "runs": len(ok),
            "errors": errors,
            "median_s": med("seconds"),
            "steps": med("steps"),
            "ms_per_step": med("ms_per_step"),
            "exact": exact,
            "peak_mb": max((r["peak_mb"] for r in ok), default=None),
        }
    for method, row in rows.items():
        ref = rows[METHODS[method][1]]
        both_exact = all(r["runs"] and r["exact"] == r["runs"] for r in (row, ref))
        row["ratio"] = row["median_s"] / ref["median_s"] if both_exact else None
    return list(rows.values())


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table(rows: list[dict[str, Any]]) -> str:
    header = ["task", "method", "median s", "steps", "ms/step", "exact", "peak MB", "ratio"]
    return markdown_table(
        header,
        [
            [
                r["task"],
                r["method"],
                fmt(r["median_s"], ".3f"),
                fmt(r["steps"], "g"),
                fmt(r["ms_per_step"], ".2f"),
                (
                    "yes"
                    if r["exact"] == r["runs"]
                    else "no"
                    if not r["exact"]
                    else f"{r['exact']}/{r['runs']}"
                )
                if r["runs"]
                else f"error: {r['errors'][0]}",
                fmt(r["peak_mb"], ".0f"),
                fmt(r["ratio"], ".2f"),
            ]
            for r in rows
        ],
    )


def _competitor() -> subprocess.Popen:
    """Background load: one thread multiplying 512×512 matrices until killed."""
    code = "import torch\nx = torch.randn(512, 512)\nwhile True:\n    x = torch.tanh(x @ x)\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", code], env=env)
    atexit.register(process.kill)  # also when the run fails
    return process


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    p.add_argument("--repeats", type=int, help="runs per method (default 3; 1 for the big tasks)")
    p.add_argument("--quick", action="store_true", help="the three small MLPs, once each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/peers")
    p.add_argument(
        "--compete",
        action="store_true",
        help="run a competing process (one thread of matrix products) the whole time; default out "
        "results/peers/compete",
    )
    args = p.parse_args()
    if args.compete and args.out == "results/peers":
        args.out = "results/peers/compete"
    competitor = _competitor() if args.compete else None
    tasks = list(TASKS)[:3] if args.quick else args.tasks
    print("OMP_NUM_THREADS=1, MKL_NUM_THREADS=1 in every process; torch", torch.__version__, flush=True)
    runs: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for task in tasks:
            path = Path(tmp) / f"{task}.pt"
            prepare(task, args.seed, path)
            repeats = 1 if args.quick else args.repeats or (1 if task in BIG else 3)
            order = list(METHODS)
            task_runs = []
            for r in range(repeats):
                for method in order[r % len(order) :] + order[: r % len(order)]:  # rotate the order
                    task_runs.append(run_one(method, task, args.seed, path))
                    print(json.dumps(task_runs[-1]), flush=True)
            runs += task_runs
            rows += summarize(task, task_runs)
    note = (
        f"OMP_NUM_THREADS=1 and MKL_NUM_THREADS=1 for every process; torch {torch.__version__}; "
        f"peers {', '.join(PEERS.values())}. Seconds: the whole call, setup (spec discovery or graph "
        "tracing) included, imports excluded; ms/step: the optimisation loop alone; peak MB: the "
        "worker's max RSS (the Python + torch baseline included); ratio: median s over the authors' "
        "(Sinkhorn) or snimu's (weight matching), only where both were exact in every run. "
        "ours-align: align(cost='l2') with its defaults (a weight-matching start; stops at a zero "
        "hard cost or once the hard permutation is stable for 5 steps); ours-sinkhorn: the same "
        "with stop_at_zero_cost=False (only the stability rule), i.e. the Sinkhorn loop's own speed. "
        "authors: their examples' settings (AdamW, "
        f"DistL2Loss lr 0.1; ResNet18 DistL1Loss lr 10; at most {AUTHORS_MAX_STEPS} steps, stopping at a "
        "zero hard loss, that check run under torch.no_grad() as a careful user would); snimu: "
        "PermutationCoordinateDescent(a, b, x).rebasin() (max_iterations 100)."
    )
    if competitor is not None:
        competitor.kill()
        note += " Measured with one competing process (a one-thread matrix-product loop) running throughout."
    md = table(rows)
    print("\n" + md + "\n\n" + note)
    out = Path(args.out)
    write_json(out / "peers.json", {"note": note, "peers": PEERS, "summary": rows, "runs": runs})
    (out / "peers.md").write_text(md + "\n\n" + note + "\n")
    print(f"\nwritten to {out}/")


if __name__ == "__main__":
    main()

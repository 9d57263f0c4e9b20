"""The GPU check: one command, at most 5 minutes on one GPU, numbers into ``results/speed/gpu/``.

    python benchmarks/gpu_check.py --prepare    # where there is an index: the peers' wheels
    python benchmarks/gpu_check.py              # on the GPU machine (no network needed)

It runs, each under its own time limit, and records every step's output and exit status:

1. the device-agnostic tests on the GPU (``pytest tests/test_devices.py --device cuda``);
2. the continual-learning overhead table on the GPU (``cl_overhead.py --device cuda``, one
   repeat, every setting), the floors counted as on the CPU;
3. the peers' alignment rows (``peers.py --tasks resnet18-224 mlp-784-512x4-10`` with
   ``PEERS_DEVICE=cuda``), the peers installed from ``.cache/wheels`` when it exists.

``results/speed/gpu/check.json`` holds the device, the versions and each step's status and
seconds; the steps write ``cl_overhead.{md,json}``, ``peers/`` and ``tests.log`` beside it.
CI never runs this: it needs a CUDA device and refuses to start without one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WHEELS = ROOT / ".cache" / "wheels"
WHEEL_PACKAGES = ("sinkhorn-rebasin==0.0.2", "rebasin==0.0.47", "graphviz", "torchview", "torchviz")
# step → (command, seconds allowed); the three together fit in 5 minutes
STEPS = {
    "tests": ([sys.executable, "-m", "pytest", "-q", "tests/test_devices.py", "--device", "cuda"], 60),
    "cl_overhead": ([sys.executable, "benchmarks/cl_overhead.py", "--device", "cuda", "--repeats", "1"], 150),
    "peers": ([sys.executable, "benchmarks/peers.py", "--tasks", "resnet18-224", "mlp-784-512x4-10"], 90),
}


def prepare() -> None:
    """Download the peers' wheels (and their small dependencies) for an offline install."""
    WHEELS.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(WHEELS), *WHEEL_PACKAGES]
    subprocess.run(command, check=True)
    print(f"wheels in {WHEELS}: {sorted(p.name for p in WHEELS.iterdir())}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", action="store_true", help="download the peers' wheels and stop")
    p.add_argument("--out", default="results/speed/gpu")
    p.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS))
    args = p.parse_args()
    if args.prepare:
        prepare()
        return
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA device; run this on a machine with a GPU.")
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PEERS_DEVICE": "cuda", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    record: dict = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "steps": {},
    }
    for name in args.steps:
        command, limit = STEPS[name]
        if name != "tests":  # the benchmarks write their tables beside this check's record
            command = [*command, "--out", str(out / "peers" if name == "peers" else out)]
        start = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
            status, log = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as expired:  # what it printed before the limit is kept
            status, log = "timeout", f"{expired.stdout or ''}{expired.stderr or ''}"
        seconds = time.perf_counter() - start
        (out / f"{name}.log").write_text(log)
        record["steps"][name] = {"command": command, "status": status, "seconds": round(seconds, 1)}
        print(f"{name}: {status} in {seconds:.0f} s", flush=True)
    (out / "check.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"written to {out}/")


if __name__ == "__main__":
    main()

"""A 2-process gloo ``torchrun`` of RebasinStrategy equals the single-process run.

Both runs (tests/distributed_rebasin_run.py) train 3 experiences with the same global batch
(16 = 2 × 8); the data order matches exactly (see the script), so only the float order of
DDP's gradient mean differs. Measured max |Δweight| ≤ 9e-8 (torch 2.14, CPU); the tolerance
is 1e-5. Variants: SimpleMLP and MTSimpleMLP.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pytest
import torch

SCRIPT = Path(__file__).with_name("distributed_rebasin_run.py")
ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-5
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs: Collection[subprocess.Popen[str]]) -> None:
    """SIGTERM (torchrun passes it on to its workers), then SIGKILL what is left."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any] | str]:
    """Launch the four runs side by side: a saved result, or the failed run's output."""
    tmp = tmp_path_factory.mktemp("distributed")
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    out = {name: tmp / f"{name}.pt" for name in ("single", "single_mt", "ddp", "ddp_mt")}
    commands = {
        "single": [sys.executable, str(SCRIPT), f"mlp={out['single']}", f"multitask={out['single_mt']}"]
    }
    for name, variant in (("ddp", "mlp"), ("ddp_mt", "multitask")):
        commands[name] = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        commands[name] += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
        commands[name] += ["--monitor-interval", "0.1", str(SCRIPT), f"{variant}={out[name]}"]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    procs = {name: subprocess.Popen(cmd, env=env, **pipes) for name, cmd in commands.items()}
    deadline = time.monotonic() + TIMEOUT_S
    failures = {}
    for name, proc in procs.items():
        try:
            output, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            _stop(procs.values())
            pytest.fail(f"the {name} run took over {TIMEOUT_S} s")
        failures[name] = f"the {name} run failed (exit {proc.returncode}):\n{output[-6000:]}"
    source = {"single": "single", "single_mt": "single", "ddp": "ddp", "ddp_mt": "ddp_mt"}
    return {name: torch.load(path) if path.exists() else failures[source[name]] for name, path in out.items()}


def _result(runs: dict[str, dict[str, Any] | str], name: str) -> dict[str, Any]:
    """The saved result of run ``name``; its output as the failure message if it failed."""
    result = runs[name]
    assert not isinstance(result, str), result
    return result


def _max_diff(a: dict[str, Any], b: dict[str, Any], stage: str) -> float:
    """Max |Δ| over every tensor of the two state dicts saved under ``stage``."""
    return max((a[stage][k].double() - b[stage][k].double()).abs().max().item() for k in a[stage])


def test_ddp_final_weights_equal_single_process(runs: dict[str, dict[str, Any] | str]) -> None:
    """SimpleMLP: the weights after experience 0 and after the last commit agree."""
    single, ddp = _result(runs, "single"), _result(runs, "ddp")
    assert (single["world_size"], ddp["world_size"]) == (1, 2)
    for stage in ("after_first", "final"):
        diff = _max_diff(single, ddp, stage)
        assert diff <= TOLERANCE, f"{stage}: max |Δweight| = {diff:.3g}"


def test_ddp_trained_the_rebasin_network_and_committed(runs: dict[str, dict[str, Any] | str]) -> None:
    """DDP wrapped the RebasinNetwork, each rank took half the batch, and both commits happened."""
    single, ddp = _result(runs, "single"), _result(runs, "ddp")
    ddp_names = ["DistributedDataParallel(SimpleMLP)", *["DistributedDataParallel(RebasinNetwork)"] * 2]
    assert ddp["models"] == ddp_names
    assert single["models"] == ["SimpleMLP(SimpleMLP)", *["RebasinNetwork(RebasinNetwork)"] * 2]
    assert ddp["batches"] == [[8] * 12] * 3 and single["batches"] == [[16] * 12] * 3  # 2 epochs × 6 steps
    assert [r["experience"] for r in ddp["reports"]] == [1, 2]
    for a, b in zip(single["reports"], ddp["reports"]):
        assert a["units_moved"] == b["units_moved"]
        assert a["delta_norm"] == pytest.approx(b["delta_norm"], rel=1e-4)
    assert _max_diff(ddp, {"final": ddp["after_first"]}, "final") > 1e-2  # the commits moved the weights


def test_ddp_multitask_equals_single_process(runs: dict[str, dict[str, Any] | str]) -> None:
    """MTSimpleMLP on task-labelled experiences (a δ of another task's head is unused in the
    forward; its penalty gradient must not reach DDP twice): the same agreement."""
    single, ddp = _result(runs, "single_mt"), _result(runs, "ddp_mt")
    assert ddp["models"][1] == "DistributedDataParallel(_MultiTaskRebasinNetwork)"
    assert len(ddp["reports"]) == 2
    for stage in ("after_first", "final"):
        diff = _max_diff(single, ddp, stage)
        assert diff <= TOLERANCE, f"{stage}: max |Δweight| = {diff:.3g}"

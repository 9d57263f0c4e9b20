"""The examples the README points to run as a newcomer runs them (shortened by their own flags)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *argv: str, cwd: Path) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *argv],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_align_demo_recovers_the_permutation_and_explains_its_table(tmp_path):
    out = _run("align_demo.py", "--epochs", "2", cwd=tmp_path)
    assert "units assigned wrongly: 0 of 256" in out
    assert "Loss barrier:" in out and "Sinkhorn + C_Mid" in out and "thread(s)" in out


def test_rotated_mnist_example_trains_and_logs_offline(tmp_path):
    logs, data = str(tmp_path / "logs"), str(tmp_path / "mnist")
    argv = ["--experiences", "2", "--epochs", "1", "--log-dir", logs, "--data-root", data]
    out = _run("rebasin_rotated_mnist.py", *argv, cwd=tmp_path)
    assert (tmp_path / "logs" / "csv" / "eval_results.csv").exists()
    assert "Top1_Acc_Stream" in out

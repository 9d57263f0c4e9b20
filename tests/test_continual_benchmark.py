"""The README's first command, `benchmarks/continual.py --quick`, runs end to end offline."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_comparison_runs_offline_and_writes_results(tmp_path):
    out = tmp_path / "quick"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "continual.py"),
        "--quick",
        "--out",
        str(out),
        "--cache",
        str(tmp_path / "cache"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads((out / "runs.json").read_text())["runs"]
    names = {r["strategy"] for r in runs}
    assert {
        "naive",
        "replay",
        "ewc",
        "lwf",
        "agem",
        "rebasin",
        "rebasin-noreplay",
        "rebasin-nopermute",
        "rebasin:midpoint",
        "rebasin:consistent",
        "joint",
    } <= names
    for run in runs:
        assert 0.0 <= run["final_acc"] <= 1.0
        assert len(run["history"]) == (1 if run["strategy"] == "joint" else 5)
    rebasin = next(r for r in runs if r["strategy"] == "rebasin")
    assert len(rebasin["rebasin_reports"]) == 4  # every experience after the first
    assert {"mean_row_max", "units_moved", "acc_trained", "acc_committed"} <= set(
        rebasin["rebasin_reports"][0]
    )
    summary = (out / "summary.md").read_text()
    assert "| rebasin |" in summary and "| naive |" in summary
    assert (out / "accuracy_curve.png").stat().st_size > 0 and (out / "accuracy_matrix.png").exists()
    assert (out / "metrics.csv").read_text().count("\n") > 50
    assert "accuracy" in proc.stdout


def test_presets_overrides_models_and_permuted_mnist_run_from_the_command_line(tmp_path):
    out = tmp_path / "permuted"
    tokens = ["replay", "rebasin:consistent+tau_final=0.1", "rebasin-nopermute:consistent+delta_lr=3e-3"]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "continual.py"), "--quick"]
    cmd += ["--benchmark", "permuted-mnist", "--model", "mlp2", "--experiences", "3", "--strategies", *tokens]
    cmd += ["--out", str(out), "--cache", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads((out / "runs.json").read_text())["runs"]
    assert [r["strategy"] for r in runs] == tokens
    assert all(r["model"] == "mlp2" and len(r["history"]) == 3 for r in runs)
    assert all(0.0 <= r["final_acc"] <= 1.0 for r in runs)
    consistent = runs[1]["rebasin_reports"]
    assert len(consistent) == 2 and all(r["units_total"] == 512 for r in consistent)  # two hidden layers
    bad = subprocess.run(
        [*cmd[:2], "--strategies", "replay:consistent"], capture_output=True, text=True, cwd=tmp_path
    )
    assert bad.returncode != 0 and "presets and overrides apply only to" in bad.stderr

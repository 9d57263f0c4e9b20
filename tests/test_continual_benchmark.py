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

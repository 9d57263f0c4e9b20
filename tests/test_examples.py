"""The examples the README points to run as a newcomer runs them (shortened by their own flags;
run in-process with their command line, so Avalanche is imported once)."""

import runpy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, argv: list[str], monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", [script, *argv])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)  # the examples choose their own thread count
    return capsys.readouterr().out


def test_align_demo_recovers_the_permutation_and_explains_its_table(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    out = _run("align_demo.py", ["--epochs", "2"], monkeypatch, capsys)
    assert "units assigned wrongly: 0 of 256" in out
    assert "Loss barrier:" in out and "Sinkhorn + C_Mid" in out and "thread(s)" in out


def test_rotated_mnist_example_trains_and_logs_offline(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    logs, data = str(tmp_path / "logs"), str(tmp_path / "mnist")
    argv = ["--experiences", "2", "--epochs", "1", "--log-dir", logs, "--data-root", data]
    out = _run("rebasin_rotated_mnist.py", argv, monkeypatch, capsys)
    assert (tmp_path / "logs" / "csv" / "eval_results.csv").exists()
    assert "Top1_Acc_Stream" in out

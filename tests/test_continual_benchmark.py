"""The README's first command, `benchmarks/continual.py --quick`, runs end to end offline."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_harness() -> Any:
    spec = importlib.util.spec_from_file_location("continual_harness", ROOT / "benchmarks" / "continual.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


harness = _load_harness()


def test_quick_comparison_runs_offline_and_writes_results(tmp_path):
    """The demo's own command line, end to end in a subprocess, on a subset of its strategies
    (each default strategy is built from its token up front by the validation tests)."""
    out = tmp_path / "quick"
    strategies = ["naive", "replay", "rebasin", "rebasin:midpoint", "joint"]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "continual.py"), "--quick", "--experiences", "3"]
    cmd += ["--strategies", *strategies, "--out", str(out), "--cache", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads((out / "runs.json").read_text())["runs"]
    assert {r["strategy"] for r in runs} == set(strategies)
    for run in runs:
        assert 0.0 <= run["final_acc"] <= 1.0
        assert len(run["history"]) == (1 if run["strategy"] == "joint" else 3)
    rebasin = next(r for r in runs if r["strategy"] == "rebasin")
    assert len(rebasin["rebasin_reports"]) == 2  # every experience after the first
    assert {"mean_row_max", "units_moved", "acc_trained", "acc_committed"} <= set(
        rebasin["rebasin_reports"][0]
    )
    summary = (out / "summary.md").read_text()
    assert "| rebasin |" in summary and "| naive |" in summary
    assert (out / "accuracy_curve.png").stat().st_size > 0 and (out / "accuracy_matrix.png").exists()
    assert (out / "metrics.csv").read_text().count("\n") > 20
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


# -- command-line checks: every one refuses before anything runs or is written (issue 10) ----------


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a strategy ran")

    monkeypatch.setattr(harness, "run_one", refuse)


def _refused(argv: list[str], tmp_path: Path, capsys) -> str:
    """Run main with argv (into tmp_path/out); assert a usage error and return its message."""
    with pytest.raises(SystemExit) as exit_info:
        harness.main([*argv, "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])
    assert exit_info.value.code == 2
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("rebasin+foo=1", "unknown setting 'foo'"),
        ("rebasin:consistent+train_mb_size=10", "unknown setting 'train_mb_size'"),
        ("rebasin+alpha=abc", "alpha must be a number in [0, 1], got 'abc'"),
        ("rebasin-nopermute+alpha=2", "alpha must be a number in [0, 1], got 2"),
        ("rebasin+sinkhorn_iters=0.5", "sinkhorn_iters must be an integer >= 1"),
        ("rebasin+alpha", "is not key=value"),
        ("rebasin+alpha=0.1+alpha=0.2", "'alpha' is set twice"),
        ("rebasin+seed=3", "is set by the harness"),
        ("rebasin:fast", "unknown preset 'fast'"),
        ("replay+alpha=0.1", "presets and overrides apply only to"),
    ],
)
def test_bad_strategy_tokens_are_refused_before_any_strategy_runs(
    token, message, tmp_path, capsys, no_training
):
    err = _refused(["--strategies", "naive", token], tmp_path, capsys)
    assert message in err and "--strategies" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epochs", "0"], "--epochs: must be an integer >= 1, got '0'"),
        (["--epochs", "-2"], "--epochs: must be an integer >= 1"),
        (["--experiences", "0"], "--experiences: must be an integer >= 1, got '0'"),
        (["--seeds", "-1"], "--seeds: must be an integer in [0, 2**32 - 1]"),
        (["--seeds", "0", "1", "0"], "--seeds lists 0 more than once"),
        (["--seeds", "x"], "--seeds: must be an integer"),
        (["--strategies", "naive", "naive"], "--strategies lists naive more than once"),
        (["--ewc-tuned-lambda", "-1"], "--ewc-tuned-lambda: must be a finite number >= 0"),
        (["--ewc-tuned-lambda", "nan"], "--ewc-tuned-lambda: must be a finite number >= 0"),
        (["--tune-ewc", "10", "-5"], "--tune-ewc: must be a finite number >= 0"),
        (["--benchmark", "split-cifar100", "--experiences", "7"], "needs a divisor of 100"),
        (["--benchmark", "split-cifar100"], "Split CIFAR-100 needs a local copy"),
        (["--device", "nonsense"], "is not a torch device"),
        (["--benchmark", "split-cifar100", "--validation"], "would read the test set"),
        (["--full-mnist", "--tune-ewc", "10"], "with --full-mnist they would read the test set"),
        (["--merge", "no-such-folder"], "--merge no-such-folder: no runs.json there"),
    ],
)
def test_bad_numbers_and_folders_are_refused_with_the_fix(argv, message, tmp_path, capsys, no_training):
    assert message in _refused(argv, tmp_path, capsys)


def _fake_run(name: str, args: Any, seed: int) -> dict[str, Any]:
    row = {"after": 0, "acc": 0.5, "forgetting": 0.0, "per_exp": {0: 0.5}}
    return {"strategy": name, "seed": seed, "final_acc": 0.5, "final_forgetting": 0.0,
            "train_seconds_per_exp": 0.0, "history": [row]}  # fmt: skip


def _saved(folder: Path, **settings: str) -> Path:
    args = {"benchmark": "rotated-mnist", "model": "mlp1", "epochs": "5", "experiences": "20"}
    args |= {"validation": "False", "full_mnist": "False", "ewc_tuned_lambda": "1000.0", **settings}
    folder.mkdir()
    (folder / "runs.json").write_text(json.dumps({"args": args, "runs": [_fake_run("naive", None, 7)]}))
    return folder


@pytest.mark.parametrize("option", ["--out", "--merge"])
def test_runs_with_other_settings_are_never_combined(option, tmp_path, capsys, no_training):
    saved = _saved(tmp_path / "saved", epochs="1", validation="True")
    before = (saved / "runs.json").read_text()
    argv = ["--strategies", "naive", "--out", str(saved)]
    if option == "--merge":
        argv = [*argv[:2], "--merge", str(saved), "--out", str(tmp_path / "merged")]
    with pytest.raises(SystemExit):
        harness.main(argv)
    err = capsys.readouterr().err
    assert f"{option} {saved} holds runs made with other settings" in err
    assert "(epochs 1 there, 5 now; validation True there, False now)" in err
    assert ("--overwrite" in err.splitlines()[-1]) == (option == "--out")
    assert (saved / "runs.json").read_text() == before and sorted(tmp_path.iterdir()) == [saved]


def test_same_settings_add_runs_and_overwrite_replaces_them(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "run_one", _fake_run)
    monkeypatch.setattr(harness, "plot", lambda *args: None)
    out = _saved(tmp_path / "out")
    harness.main(["--strategies", "naive", "--seeds", "0", "--out", str(out)])
    assert sorted(r["seed"] for r in json.loads((out / "runs.json").read_text())["runs"]) == [0, 7]
    harness.main(["--strategies", "naive", "--epochs", "2", "--overwrite", "--out", str(out)])
    saved = json.loads((out / "runs.json").read_text())
    assert [r["seed"] for r in saved["runs"]] == [0] and saved["args"]["epochs"] == "2"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["out"]  # no temporary folder left


def test_an_error_while_writing_leaves_no_results_folder(tmp_path, monkeypatch):
    def broken_plot(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(harness, "run_one", _fake_run)
    monkeypatch.setattr(harness, "plot", broken_plot)
    with pytest.raises(RuntimeError, match="disk full"):
        harness.main(["--strategies", "naive", "--out", str(tmp_path / "out")])
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(autouse=True)
def offline_cifar(monkeypatch):
    """Tests never download: torchvision's CIFAR download fails as it does without network."""
    import urllib.error

    from torchvision.datasets import CIFAR100

    def offline(self):
        if not self._check_integrity():  # as torchvision's: a verified copy is not downloaded
            raise urllib.error.URLError("no network in the tests")

    monkeypatch.setattr(CIFAR100, "download", offline)


def _tiny_cifar100(root: Path, per_class: int = 2) -> None:
    """A CIFAR-100 copy in the official format (python pickles), ``per_class`` images per class."""
    import pickle

    import numpy as np

    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", per_class), ("test", 1)):
        labels = [c for c in range(100) for _ in range(n)]
        batch = {
            "data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8),
            "fine_labels": labels,
            "coarse_labels": [c // 5 for c in labels],
            "filenames": [f"{i}.png" for i in range(len(labels))],
            "batch_label": name,
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {
        "fine_label_names": [f"class{c}" for c in range(100)],
        "coarse_label_names": [str(c) for c in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta))


def test_split_cifar100_loads_a_copy_in_the_official_format_and_runs(tmp_path, monkeypatch, capsys):
    from torchvision.datasets import CIFAR100

    _tiny_cifar100(tmp_path / "data")
    out = tmp_path / "out"
    argv = ["--benchmark", "split-cifar100", "--data-root", str(tmp_path / "data"), "--experiences", "2"]
    argv += [
        "--strategies",
        "naive",
        "rebasin",
        "--epochs",
        "1",
        "--out",
        str(out),
        "--cache",
        str(tmp_path / "c"),
    ]
    with pytest.raises(SystemExit):  # the checksum is real: a copy that differs is refused, named
        harness.main(argv)
    assert "does not match the official archive" in capsys.readouterr().err and not out.exists()
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(CIFAR100, "_check_integrity", lambda self: True)  # the checksums, bypassed here only
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    harness.main(argv)
    runs = json.loads((out / "runs.json").read_text())["runs"]
    assert {r["strategy"] for r in runs} == {"naive", "rebasin"}
    assert all(len(r["history"]) == 2 for r in runs)


def test_split_mnist_runs_class_incrementally_on_the_embedded_digits(tmp_path):
    out = tmp_path / "split"
    argv = ["--benchmark", "split-mnist", "--quick", "--strategies", "naive", "rebasin:midpoint"]
    harness.main([*argv, "--out", str(out), "--cache", str(tmp_path / "cache")])
    runs = json.loads((out / "runs.json").read_text())["runs"]
    assert {r["strategy"] for r in runs} == {"naive", "rebasin:midpoint"}
    naive = next(r for r in runs if r["strategy"] == "naive")
    assert len(naive["history"]) == 5 and 0.0 < naive["final_acc"] < 0.5  # class-incremental forgetting


def _tiny_fashion_mnist(root: Path, per_class: int = 20) -> None:
    """Torchvision's FashionMNIST/raw files (idx format, already extracted), few images."""
    import struct

    import numpy as np

    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", per_class), ("t10k", 2)):
        labels = np.repeat(np.arange(10, dtype=np.uint8), n)
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, len(labels), 28, 28) + images.tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, len(labels)) + labels.tobytes()
        )


def test_split_fashion_mnist_reads_torchvision_raw_files(tmp_path):
    _tiny_fashion_mnist(tmp_path / "data")
    out = tmp_path / "out"
    argv = ["--benchmark", "split-fashion-mnist", "--data-root", str(tmp_path / "data"), "--quick"]
    harness.main(
        [*argv, "--strategies", "naive", "rebasin", "--out", str(out), "--cache", str(tmp_path / "c")]
    )
    runs = json.loads((out / "runs.json").read_text())["runs"]
    assert {r["strategy"] for r in runs} == {"naive", "rebasin"}
    assert all(len(r["history"]) == 5 for r in runs)


def test_every_random_number_generator_is_seeded_per_run():
    """A-GEM samples its memory with Python's random: unseeded, its runs differed (57.08 vs 56.84 %)."""
    import random

    import numpy as np
    from avalanche.training.plugins import EvaluationPlugin

    args = harness.make_parser().parse_args([])
    draws = []
    for _ in range(2):
        random.seed(None)
        np.random.seed(None)
        harness.build("agem", args, 10, 3, EvaluationPlugin(loggers=[]))
        draws.append((random.random(), float(np.random.rand())))
    assert draws[0] == draws[1]


def test_rotated_fashion_mnist_rotates_every_class_per_experience(tmp_path):
    _tiny_fashion_mnist(tmp_path / "data", per_class=4)
    out = tmp_path / "out"
    argv = ["--benchmark", "rotated-fashion-mnist", "--data-root", str(tmp_path / "data"), "--quick"]
    harness.main(
        [
            *argv,
            "--experiences",
            "3",
            "--strategies",
            "naive",
            "--out",
            str(out),
            "--cache",
            str(tmp_path / "c"),
        ]
    )
    runs = json.loads((out / "runs.json").read_text())["runs"]
    assert len(runs[0]["history"]) == 3
    args = harness.make_parser().parse_args(
        ["--benchmark", "rotated-fashion-mnist", "--data-root", str(tmp_path / "data")]
    )
    args.experiences = 3
    bench, _ = harness.make_benchmark(args, 0)
    first = [bench.train_stream[k].dataset[0][0] for k in range(3)]  # one image under three angles
    assert all(len(set(bench.train_stream[k].classes_in_this_experience)) == 10 for k in range(3))
    assert not torch.equal(first[0], first[2])  # 0° and 180°

"""The comparison harness (`benchmarks/continual.py`, `avalanche-rebasin-compare`): the README's
first command end to end offline, every refusal, every benchmark's loading code on tiny data."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from avalanche_rebasin_experiments import benchmarks, cli, reporting, runner, strategies

ROOT = Path(__file__).resolve().parents[1]


def test_quick_comparison_runs_offline_and_writes_results(tmp_path):
    """The demo's own command line, end to end in a subprocess, on a subset of its strategies
    (each default strategy is built from its token up front by the validation tests)."""
    out = tmp_path / "quick"
    strategies = ["naive", "replay", "rebasin", "rebasin:midpoint", "interp+alignment=sinkhorn_mid", "joint"]
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
    interp = next(r for r in runs if r["strategy"].startswith("interp"))
    assert [rep["experience"] for rep in interp["interpolation_reports"]] == [1, 2]
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
    assert bad.returncode != 0 and "presets apply only to" in bad.stderr


# -- command-line checks: every one refuses before anything runs or is written (issue 10) ----------


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a strategy ran")

    monkeypatch.setattr(runner, "run_one", refuse)


def _refused(argv: list[str], tmp_path: Path, capsys) -> str:
    """Run main with argv (into tmp_path/out); assert a usage error and return its message."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])
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
        ("rebasin+n_iter=0.5", "n_iter must be an integer >= 1"),
        ("rebasin+alpha", "is not key=value"),
        ("interp+alpha=1e+0", "numbers are written without one: 1e0"),
        ("rebasin+alpha=0.1+alpha=0.2", "'alpha' is set twice"),
        ("rebasin+seed=3", "is set by the harness"),
        ("rebasin:fast", "unknown preset 'fast'"),
        ("replay+alpha=0.1", "unknown setting 'alpha'; replay overrides one of ['mem_size']"),
        ("replay:midpoint", "presets apply only to"),
        ("naive+mem_size=10", "naive has no settings to override"),
        ("replay+mem_size=0", "mem_size must be an integer >= 1, got 0"),
        ("replay+mem_size=2.5", "mem_size must be an integer >= 1, got 2.5"),
        ("lwf+alpha=abc", "alpha must be a finite number >= 0, got 'abc'"),
        ("ewc-tuned+ewc_lambda=-1", "ewc_lambda must be a finite number >= 0"),
        ("interp+head_alpha=2", "layer_alpha['classifier'] must be a number in [0, 1], got 2"),
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
        (["--benchmark", "split-cifar100", "--model", "mlp1"], "split-cifar100 needs slimresnet18"),
        (["--model", "slimresnet18"], "rotated-mnist needs a 28×28 model"),
        (["--benchmark", "split-fashion-mnist", "--full-mnist"], "--full-mnist applies to the MNIST"),
        (["--full-mnist", "--tune-ewc", "10"], "--full-mnist: MNIST could not be read or downloaded"),
        (["--mem-size", "3"], "--mem-size 3: give at least one slot per experience (20)"),
        (["--lr", "0"], "--lr: must be a finite number > 0"),
        (["--optimizer", "lbfgs"], "invalid choice: 'lbfgs'"),
        (["--threads", "0"], "--threads: must be an integer >= 1"),
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
        cli.main(argv)
    err = capsys.readouterr().err
    assert f"{option} {saved} holds runs made with other settings" in err
    assert "(epochs 1 there, 5 now; validation True there, False now)" in err
    assert ("--overwrite" in err.splitlines()[-1]) == (option == "--out")
    assert (saved / "runs.json").read_text() == before and sorted(tmp_path.iterdir()) == [saved]


def test_same_settings_skip_finished_runs_and_overwrite_replaces_them(tmp_path, monkeypatch, capsys):
    calls = []

    def counting_run(name, args, seed):
        calls.append((name, seed))
        return _fake_run(name, args, seed)

    monkeypatch.setattr(runner, "run_one", counting_run)
    monkeypatch.setattr(reporting, "plot", lambda *args: None)
    out = _saved(tmp_path / "out")
    cli.main(["--strategies", "naive", "--seeds", "0", "7", "--out", str(out)])
    assert calls == [("naive", 0)]  # naive seed 7 was already there with these settings
    assert "1 (strategy, seed) run(s) already in" in capsys.readouterr().out
    assert sorted(r["seed"] for r in json.loads((out / "runs.json").read_text())["runs"]) == [0, 7]
    cli.main(["--strategies", "naive", "--seeds", "0", "7", "--out", str(out)])
    assert calls == [("naive", 0)]  # a rerun of the finished sweep runs nothing
    cli.main(["--strategies", "naive", "--epochs", "2", "--overwrite", "--out", str(out)])
    saved = json.loads((out / "runs.json").read_text())
    assert [r["seed"] for r in saved["runs"]] == [0] and saved["args"]["epochs"] == "2"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["out"]  # no temporary folder left


def test_learning_rate_batch_and_memory_flags_are_settings_that_are_never_mixed(
    tmp_path, capsys, no_training
):
    saved = _saved(tmp_path / "saved")
    with pytest.raises(SystemExit):
        cli.main(["--strategies", "naive", "--lr", "0.01", "--batch-size", "32", "--out", str(saved)])
    assert "(lr 0.001 there, 0.01 now; batch_size 500 there, 32 now)" in capsys.readouterr().err


def test_an_error_while_writing_leaves_no_results_folder(tmp_path, monkeypatch):
    def broken_plot(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(runner, "run_one", _fake_run)
    monkeypatch.setattr(reporting, "plot", broken_plot)
    with pytest.raises(RuntimeError, match="disk full"):
        cli.main(["--strategies", "naive", "--out", str(tmp_path / "out")])
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
        cli.main(argv)
    assert "does not match the official archive" in capsys.readouterr().err and not out.exists()
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(CIFAR100, "_check_integrity", lambda self: True)  # the checksums, bypassed here only
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    cli.main(argv)
    runs = json.loads((out / "runs.json").read_text())["runs"]
    assert {r["strategy"] for r in runs} == {"naive", "rebasin"}
    assert all(len(r["history"]) == 2 for r in runs)


def test_split_mnist_runs_class_incrementally_on_the_embedded_digits(tmp_path):
    out = tmp_path / "split"
    argv = ["--benchmark", "split-mnist", "--quick", "--strategies", "naive", "rebasin:midpoint"]
    cli.main([*argv, "--out", str(out), "--cache", str(tmp_path / "cache")])
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
    cli.main([*argv, "--strategies", "naive", "rebasin", "--out", str(out), "--cache", str(tmp_path / "c")])
    runs = json.loads((out / "runs.json").read_text())["runs"]
    assert {r["strategy"] for r in runs} == {"naive", "rebasin"}
    assert all(len(r["history"]) == 5 for r in runs)


def test_every_random_number_generator_is_seeded_per_run():
    """A-GEM samples its memory with Python's random: unseeded, its runs differed (57.08 vs 56.84 %)."""
    import random

    import numpy as np
    from avalanche.training.plugins import EvaluationPlugin

    args = cli.make_parser().parse_args([])
    cli.resolve_defaults(args)
    draws = []
    for _ in range(2):
        random.seed(None)
        np.random.seed(None)
        strategies.build("agem", args, 3, EvaluationPlugin(loggers=[]))
        draws.append((random.random(), float(np.random.rand())))
    assert draws[0] == draws[1]


def test_rotated_fashion_mnist_rotates_every_class_per_experience(tmp_path):
    _tiny_fashion_mnist(tmp_path / "data", per_class=4)
    out = tmp_path / "out"
    argv = ["--benchmark", "rotated-fashion-mnist", "--data-root", str(tmp_path / "data"), "--quick"]
    cli.main(
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
    args = cli.make_parser().parse_args(
        ["--benchmark", "rotated-fashion-mnist", "--data-root", str(tmp_path / "data"), "--experiences", "3"]
    )
    cli.resolve_defaults(args)
    bench = benchmarks.BENCHMARKS["rotated-fashion-mnist"].build(args, 0)
    first = [bench.train_stream[k].dataset[0][0] for k in range(3)]  # one image under three angles
    assert all(len(set(bench.train_stream[k].classes_in_this_experience)) == 10 for k in range(3))
    assert not torch.equal(first[0], first[2])  # 0° and 180°


# -- issue 12: validation on every benchmark, overrides for baselines, provenance -------------------


def test_validation_on_fashion_mnist_holds_out_training_images_and_never_reads_the_test_set(tmp_path):
    _tiny_fashion_mnist(tmp_path / "data", per_class=20)
    test_images = tmp_path / "data" / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte"
    test_images.write_bytes(b"not an idx file: reading it would fail")
    argv = ["--benchmark", "split-fashion-mnist", "--data-root", str(tmp_path / "data"), "--validation"]
    args = cli.make_parser().parse_args([*argv, "--cache", str(tmp_path / "c")])
    cli.resolve_defaults(args)
    bench = benchmarks.BENCHMARKS["split-fashion-mnist"].build(args, 0)
    held_out = sum(len(e.dataset) for e in bench.test_stream)
    trained = sum(len(e.dataset) for e in bench.train_stream)
    assert (held_out, trained) == (20, 180)  # the last 10 % of each class's 20 training images


def test_validation_on_split_cifar100_evaluates_a_held_out_part_of_each_experience(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar
    from torchvision.datasets import CIFAR100

    _tiny_cifar100(tmp_path / "data", per_class=10)
    monkeypatch.setattr(CIFAR100, "_check_integrity", lambda self: True)  # the checksums, bypassed here only
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    argv = ["--benchmark", "split-cifar100", "--data-root", str(tmp_path / "data"), "--experiences", "2"]
    args = cli.make_parser().parse_args([*argv, "--validation"])
    cli.resolve_defaults(args)
    bench = benchmarks.BENCHMARKS["split-cifar100"].build(args, 0)
    for train, valid in zip(bench.train_stream, bench.test_stream):
        assert (len(train.dataset), len(valid.dataset)) == (450, 50)  # 50 classes × 10 images, 10 % held out
        assert set(valid.classes_in_this_experience) == set(train.classes_in_this_experience)


def test_baseline_overrides_reach_the_strategy(tmp_path):
    from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin

    args = cli.make_parser().parse_args(["--cache", str(tmp_path / "c")])
    cli.resolve_defaults(args)
    replay = strategies.build("replay+mem_size=2000", args, 0, EvaluationPlugin(loggers=[]))
    assert next(p for p in replay.plugins if isinstance(p, ReplayPlugin)).mem_size == 2000
    lwf = strategies.build("lwf+alpha=0.5+temperature=1", args, 0, EvaluationPlugin(loggers=[]))
    assert next(p for p in lwf.plugins if type(p).__name__ == "LwFPlugin").lwf.alpha == 0.5
    args.mem_size = 400
    default = strategies.build("replay", args, 0, EvaluationPlugin(loggers=[]))
    assert next(p for p in default.plugins if isinstance(p, ReplayPlugin)).mem_size == 400


def test_each_run_records_versions_commit_and_arguments(tmp_path):
    argv = ["--benchmark", "split-mnist", "--quick", "--experiences", "2", "--strategies", "naive"]
    cli.main([*argv, "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), "--loggers", "csv"])
    run = json.loads((tmp_path / "out" / "runs.json").read_text())["runs"][0]
    provenance = run["provenance"]
    assert provenance["versions"]["torch"] == torch.__version__.split("+")[0]
    assert provenance["versions"]["avalanche-lib"] and provenance["args"]["benchmark"] == "split-mnist"
    assert provenance["git_commit"] is None or len(provenance["git_commit"]) == 40
    assert provenance["threads"] == cli.DEFAULT_THREADS
    assert (
        tmp_path / "out" / "logs" / "naive-seed0" / "csv" / "eval_results.csv"
    ).exists()  # Avalanche's CSVLogger


def test_embedded_validation_split_is_disjoint_from_the_test_digits(tmp_path):
    from avalanche_rebasin_experiments.datasets import prepare_embedded_mnist, read_idx

    test_root = prepare_embedded_mnist(tmp_path / "test")
    valid_root = prepare_embedded_mnist(tmp_path / "valid", validation=True)
    raw = "MNIST/raw/{}-images-idx3-ubyte"
    train, test = (read_idx(test_root / raw.format(k)) for k in ("train", "t10k"))
    v_train, v_held = (read_idx(valid_root / raw.format(k)) for k in ("train", "t10k"))
    assert (len(train), len(test), len(v_train), len(v_held)) == (4000, 1000, 3600, 400)
    as_set = lambda images: {im.tobytes() for im in images}  # noqa: E731
    assert as_set(v_train) | as_set(v_held) == as_set(train) and not as_set(v_held) & as_set(test)


def test_matrix_panel_titles_break_long_strategy_tokens_after_a_plus():
    token = "interp+alignment=activation_matching+alpha=0.7+restart=1"
    title = reporting.panel_title(token)
    assert title.replace("\n", "") == token and title.count("\n") >= 2
    assert all(len(line) <= 24 or "+" not in line.rstrip("+") for line in title.splitlines())
    assert reporting.panel_title("replay") == "replay"

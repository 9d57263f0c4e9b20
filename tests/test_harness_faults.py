"""Faults users hit in the harness's results folder (`--out`): two sweeps into one folder, an
unwritable or malformed folder found only after training, temporary folders a kill leaves, and
Ctrl-C. Every test uses a fake run (no training); the concurrency test runs two real processes."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from avalanche_rebasin_experiments import benchmarks, cli, datasets, reporting, runner

BASE = ["--experiences", "3", "--epochs", "1"]
SETTINGS = {"benchmark": "rotated-mnist", "model": "mlp1", "epochs": "1", "experiences": "3"}


def _fake_run(name: str, args: Any, seed: int) -> dict[str, Any]:
    row = {"after": 0, "acc": 0.5, "forgetting": 0.0, "per_exp": {0: 0.5}}
    return {"strategy": name, "seed": seed, "final_acc": 0.5, "final_forgetting": 0.0,
            "train_seconds_per_exp": 0.0, "history": [row]}  # fmt: skip


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a strategy ran")

    monkeypatch.setattr(runner, "run_one", refuse)


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    monkeypatch.setattr(reporting, "plot", lambda *args: None)


def _runs(out: Path) -> list[tuple[str, int]]:
    return sorted((r["strategy"], r["seed"]) for r in json.loads((out / "runs.json").read_text())["runs"])


def _csv_runs(out: Path) -> list[tuple[str, int]]:
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    return sorted({(row.split(",")[0], int(row.split(",")[1])) for row in rows})


def _write_saved(folder: Path, runs: list[dict[str, Any]], **settings: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"args": {**SETTINGS, **settings}, "runs": runs}
    (folder / "runs.json").write_text(json.dumps(payload))
    return folder


def _hidden(folder: Path) -> list[str]:
    return sorted(f.name for f in folder.iterdir() if f.name.startswith(".") and f.name != ".lock")


# -- 1: two sweeps into one --out keep each other's runs ---------------------------------------

HELPER = """\
import sys, time
from pathlib import Path
from avalanche_rebasin_experiments import cli, reporting, runner

barrier, parties = Path(sys.argv[1]), int(sys.argv[2])
waited = []


def fake_run(name, args, seed):
    if not waited:  # both sweeps have read --out before either saves a run
        waited.append(True)
        Path(f"{barrier}-{name}-{seed}").touch()
        deadline = time.monotonic() + 120
        while len(list(barrier.parent.glob(barrier.name + "-*"))) < parties and time.monotonic() < deadline:
            time.sleep(0.02)
    time.sleep(0.05)
    row = {"after": 0, "acc": 0.5, "forgetting": 0.0, "per_exp": {0: 0.5}}
    return {"strategy": name, "seed": seed, "final_acc": 0.5, "final_forgetting": 0.0,
            "train_seconds_per_exp": 0.0, "history": [row]}


runner.run_one = fake_run
reporting.plot = lambda *args: None
cli.main(sys.argv[3:])
"""


def test_two_concurrent_sweeps_into_one_folder_keep_every_finished_run(tmp_path):
    helper = tmp_path / "fake_sweep.py"
    helper.write_text(HELPER)
    out, barrier = tmp_path / "out", tmp_path / "barrier"
    sweeps = [["naive", "replay"], ["rebasin:midpoint", "lwf"]]
    procs = []
    for k, tokens in enumerate(sweeps):
        argv = [*BASE, "--seeds", "0", "1", "--strategies", *tokens, "--out", str(out)]
        cmd = [sys.executable, str(helper), str(barrier), "2", *argv, "--cache", str(tmp_path / f"cache{k}")]
        procs.append(
            subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    for proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
    expected = sorted((t, s) for tokens in sweeps for t in tokens for s in (0, 1))
    assert _runs(out) == expected and _csv_runs(out) == expected
    assert _hidden(out) == [] and sorted(f.name for f in tmp_path.iterdir() if f.name.startswith(".")) == []


def test_a_folder_taken_by_other_settings_meanwhile_gets_this_sweeps_runs_beside_it(
    tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    theirs = [json.loads(json.dumps(_fake_run("other", None, 3)))]

    def other_sweep_saves_meanwhile(name, args, seed):
        if not (out / "runs.json").exists():  # a sweep with --epochs 9 started on the same empty folder
            _write_saved(out, theirs, epochs="9")
        return _fake_run(name, args, seed)

    monkeypatch.setattr(runner, "run_one", other_sweep_saves_meanwhile)
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*BASE, "--strategies", "naive", "--seeds", "0", "1", "--out", str(out)])
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    conflict = next(tmp_path.glob("out.conflict-*"))
    assert str(conflict) in err and "--merge" in err and "epochs 9 there, 1 now" in err
    assert json.loads((out / "runs.json").read_text())["runs"] == theirs  # theirs untouched
    assert _runs(conflict) == [("naive", 0)]  # the run that finished is kept, the sweep stopped
    cli.main([*BASE, "--strategies", "naive", "--merge", str(conflict), "--out", str(tmp_path / "merged")])
    assert _runs(tmp_path / "merged") == [("naive", 0)]


def test_overwrite_discards_the_runs_found_at_start_but_not_those_another_sweep_added(tmp_path, monkeypatch):
    out = _write_saved(tmp_path / "out", [_fake_run("naive", None, 7)], epochs="5")
    other_run = json.loads(json.dumps(_fake_run("replay", None, 0)))

    def other_sweep_saves_meanwhile(name, args, seed):  # another --overwrite sweep, same settings
        _write_saved(out, [other_run])
        return _fake_run(name, args, seed)

    monkeypatch.setattr(runner, "run_one", other_sweep_saves_meanwhile)
    cli.main([*BASE, "--strategies", "naive", "--overwrite", "--out", str(out)])
    assert _runs(out) == [("naive", 0), ("replay", 0)]  # naive seed 7 (epochs 5) discarded


def test_two_sweeps_preparing_one_cold_cache_at_once_both_get_the_digits(tmp_path, monkeypatch):
    """The other sweep's copy lands between this one's check and its own final rename."""
    real_write = datasets.write_split

    def the_other_sweep_wrote_first(raw, train, test):
        if not raw.exists():
            real_write(raw, train, test)
        real_write(raw, train, test)  # this sweep's rename onto a folder that is there now

    monkeypatch.setattr(datasets, "write_split", the_other_sweep_wrote_first)
    args = cli.make_parser().parse_args([*BASE, "--cache", str(tmp_path / "cache")])
    cli.resolve_defaults(args)
    root = benchmarks.mnist_root(args)
    assert sorted(f.name for f in (root / "MNIST" / "raw").iterdir()) == sorted(datasets.IDX_NAMES)


# -- 2: an unwritable or malformed folder is refused before anything trains -------------------


def _refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*BASE, "--strategies", "naive", *argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_an_out_below_a_file_is_refused_before_anything_trains(tmp_path, capsys, no_training):
    (tmp_path / "file").write_text("not a folder")
    err = _refused(["--out", str(tmp_path / "file" / "sub" / "out")], capsys)
    assert f"{tmp_path / 'file'} is a file" in err and "--out" in err
    assert sorted(f.name for f in tmp_path.iterdir()) == ["file"]


def test_an_unwritable_out_is_refused_and_the_folders_the_probe_made_are_removed(
    tmp_path, monkeypatch, capsys, no_training
):
    def denied(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", str(dir))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    out = tmp_path / "a" / "b" / "out"
    err = _refused(["--out", str(out)], capsys)
    assert f"cannot write in {out}" in err and "permission" in err.lower()
    assert list(tmp_path.iterdir()) == []  # no empty results folder left on refusal


BAD_SHAPES = [
    ({"args": [], "runs": []}, "'args' is a list, not an object"),
    ({"args": SETTINGS, "runs": {}}, "'runs' is an object, not a list"),
    ({"args": SETTINGS, "runs": [{k: v for k, v in _fake_run("naive", None, 7).items() if k != "seed"}]},
     "runs[0] (naive) has no 'seed'"),
    ({"args": SETTINGS, "runs": [_fake_run("naive", None, 7), {**_fake_run("lwf", None, 1), "seed": "1"}]},
     "runs[1] (lwf): 'seed' is a string, not an integer"),
    ({"args": SETTINGS, "runs": [{k: v for k, v in _fake_run("naive", None, 7).items() if k != "history"}]},
     "runs[0] (naive) has no 'history'"),
    ({"args": SETTINGS, "runs": [{**_fake_run("naive", None, 7), "history": [{"after": 0, "acc": 0.5}]}]},
     "runs[0] (naive) history[0] has no 'forgetting'"),
]  # fmt: skip


@pytest.mark.parametrize(("saved", "message"), BAD_SHAPES)
@pytest.mark.parametrize("option", ["--out", "--merge"])
def test_a_runs_json_of_the_wrong_shape_is_refused_up_front_naming_the_entry(
    saved, message, option, tmp_path, capsys, no_training
):
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "runs.json").write_text(json.dumps(saved))
    before = (folder / "runs.json").read_text()
    argv = ["--out", str(folder)]
    if option == "--merge":
        argv = ["--merge", str(folder), "--out", str(tmp_path / "merged")]
    err = _refused(argv, capsys)
    assert str(folder / "runs.json") in err and message in err
    assert (folder / "runs.json").read_text() == before and sorted(f.name for f in folder.iterdir()) == [
        "runs.json"
    ]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["saved"]


# -- 3: temporary folders live inside --out, and a stopped save is finished or removed -----------


class Killed(BaseException):
    """Stands for SIGKILL: no handler of the harness catches it."""


def test_a_save_stopped_between_its_moves_is_finished_by_the_next_start(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr(runner, "run_one", _fake_run)
    cli.main([*BASE, "--strategies", "naive", "--out", str(out)])
    real_replace, sources = os.replace, []

    def stopped_before_runs_json(src, dst):
        sources.append(Path(src))
        assert [f.name for f in tmp_path.iterdir()] == ["out"]  # nothing is staged beside --out
        if Path(dst).name == "runs.json":
            raise Killed
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", stopped_before_runs_json)
    with pytest.raises(Killed):
        cli.main([*BASE, "--strategies", "naive", "--seeds", "0", "1", "--out", str(out)])
    monkeypatch.setattr(os, "replace", real_replace)
    assert all(src.parent.parent == out and src.parent.name.startswith(".writing-") for src in sources)
    assert _csv_runs(out) == [("naive", 0), ("naive", 1)] and _runs(out) == [("naive", 0)]
    capsys.readouterr()
    monkeypatch.setattr(runner, "run_one", lambda *args: pytest.fail("a finished run ran again"))
    cli.main([*BASE, "--strategies", "naive", "--seeds", "0", "1", "--out", str(out)])
    assert _runs(out) == _csv_runs(out) == [("naive", 0), ("naive", 1)] and _hidden(out) == []
    assert "finished" in capsys.readouterr().out


def test_stale_unfinished_and_old_style_temporary_folders_are_removed_with_a_notice(
    tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    monkeypatch.setattr(runner, "run_one", _fake_run)
    cli.main([*BASE, "--strategies", "naive", "--out", str(out)])
    before = (out / "runs.json").read_text()
    unfinished = out / ".writing-k1ll3d0x"
    unfinished.mkdir()
    (unfinished / "runs.json").write_text('{"args": {}, "ru')  # killed while writing
    old_style = tmp_path / ".out.ab12cd34"  # the temporary sibling of the previous version
    old_style.mkdir()
    (old_style / "metrics.csv").write_text("strategy,seed\n")
    capsys.readouterr()
    monkeypatch.setattr(runner, "run_one", lambda *args: pytest.fail("a finished run ran again"))
    cli.main([*BASE, "--strategies", "naive", "--out", str(out)])
    notices = capsys.readouterr().out
    assert unfinished.name in notices and old_style.name in notices
    assert not unfinished.exists() and not old_style.exists() and (out / "runs.json").read_text() == before


# -- 4: Ctrl-C ends with one line saying what was kept -------------------------------------------


def _interrupted(argv: list[str], capsys) -> str:
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C ended the harness with a raw KeyboardInterrupt")
    assert exit_info.value.code == 130
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    return err


def test_ctrl_c_during_a_run_says_what_was_kept_and_exits_130(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"

    def interrupted_second_run(name, args, seed):
        if seed == 1:
            raise KeyboardInterrupt
        return _fake_run(name, args, seed)

    monkeypatch.setattr(runner, "run_one", interrupted_second_run)
    err = _interrupted([*BASE, "--strategies", "naive", "--seeds", "0", "1", "--out", str(out)], capsys)
    assert f"1 finished run(s) are in {out / 'runs.json'}" in err and "rerun the same command" in err
    assert (
        _runs(out) == [("naive", 0)]
        and _hidden(out) == []
        and [f.name for f in tmp_path.iterdir()] == ["out"]
    )


def test_ctrl_c_while_saving_leaves_no_temporary_folder(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    saves = []

    def interrupted_second_save(*args):
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_one", _fake_run)
    monkeypatch.setattr(reporting, "plot", interrupted_second_save)
    err = _interrupted([*BASE, "--strategies", "naive", "--seeds", "0", "1", "--out", str(out)], capsys)
    assert "1 finished run(s)" in err
    assert _runs(out) == _csv_runs(out) == [("naive", 0)] and _hidden(out) == []
    assert [f.name for f in tmp_path.iterdir()] == ["out"]


def test_the_writable_probe_survives_another_sweep_removing_the_folder_it_made(tmp_path, monkeypatch):
    """Two sweeps started together: one's probe removes the folder it made just before the
    other's probe writes there (the other then refused a writable --out)."""
    from avalanche_rebasin_experiments import results_folder

    real, calls = results_folder.tempfile.mkstemp, []

    def vanished_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise FileNotFoundError(2, "No such file or directory", kwargs.get("dir"))
        return real(*args, **kwargs)

    monkeypatch.setattr(results_folder.tempfile, "mkstemp", vanished_once)
    results_folder.check_writable(tmp_path / "out")
    assert len(calls) == 2 and not (tmp_path / "out").exists()

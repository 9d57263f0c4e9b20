"""MkDocs hook: serve the plots of ``results/`` without copying them into ``docs/``.

The benchmark scripts write their PNGs next to their tables under ``results/`` (the
repository root), and MkDocs serves only files inside ``docs_dir``. A page links a plot as
``plots/<path under results/>`` relative to the site root, e.g. from ``docs/results/lmc.md``::

    ![LMC](../plots/lmc/lmc.png)

Before the pages are read, this hook scans every Markdown page for such links and adds each
referenced ``results/<path>`` to the site's files under ``plots/<path>``. MkDocs then copies
it into the built site (and ``mkdocs serve`` serves it), and its link checker sees a real
file, so ``--strict`` passes. Nothing is duplicated in git, only the plots the pages use are
copied, and a link to a PNG that ``results/`` does not hold stays unresolved, so
``mkdocs build --strict`` fails on it, naming the page. (Symlinking ``docs/plots`` to
``results/`` would publish every JSON, CSV and summary there as well, and make MkDocs treat
its ``.md`` files as pages missing from the navigation.)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

PREFIX = "plots/"
LINK = re.compile(r"(?:\.\./)*plots/([\w./-]+\.png)")


def referenced_plots(docs_dir: Path) -> set[str]:
    """Paths under ``results/`` of every plot a page links as ``plots/...``."""
    return {match for page in docs_dir.rglob("*.md") for match in LINK.findall(page.read_text())}


def on_files(files: Files, config: Any, **kwargs: Any) -> Files:
    docs_dir = Path(config["docs_dir"])
    results = docs_dir.parent / "results"
    for relative in sorted(referenced_plots(docs_dir)):
        source = results / relative
        if source.is_file() and files.get_file_from_path(PREFIX + relative) is None:
            files.append(File.generated(config, PREFIX + relative, abs_src_path=str(source)))
    return files

"""The reach benchmark: permutation discovery on third-party timm and transformers models.

    python benchmarks/zoo.py                 # the whole zoo -> results/zoo/
    python benchmarks/zoo.py --only gpt2 llama

Each model is built with random initialisation from a tiny configuration (no download),
its spec discovered with ``PermutationSpec.from_model`` (verification on), a random
permutation applied and the outputs compared with the original in eval and train mode,
in float64 (see ``avalanche_rebasin_experiments.zoo``). Writes ``zoo.json``, ``zoo.csv``
and ``zoo.md`` (one row per model: verdict, groups, units, discovery seconds, change).
Needs the ``zoo`` extra (``pip install ".[zoo]"``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from avalanche_rebasin_experiments.zoo import ZOO, check_entry


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="*", help="model names (default: the whole zoo)")
    parser.add_argument("--out", type=Path, default=Path("results/zoo"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    entries = [e for e in ZOO if not args.only or e.name in args.only]
    unknown = set(args.only or []) - {e.name for e in ZOO}
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; the zoo has {[e.name for e in ZOO]}")
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for entry in tqdm(entries, desc="zoo"):
            results.append(check_entry(entry))
    rows = [dataclasses.asdict(r) for r in results]
    counts = {
        v: sum(r.verdict == v for r in results)
        for v in ("preserved", "trivial", "refused", "silent-wrong", "crash")
    }
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "zoo.json").write_text(json.dumps({"counts": counts, "models": rows}, indent=2) + "\n")
    with open(tmp / "zoo.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"{counts['preserved']} of {len(results)} preserved, "
        + ", ".join(f"{n} {v}" for v, n in counts.items() if v != "preserved"),
        "",
        "| model | family | verdict | groups | units | discovery s | max rel. change | reason |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        reason = r.reason.split(". To proceed")[0].replace("|", "/")[:160]
        cells = [r.name, r.family, r.verdict, r.groups, r.units, f"{r.seconds:.2f}", f"{r.change:.1e}"]
        cells.append(reason)
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    (tmp / "zoo.md").write_text("\n".join(lines) + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("zoo.json", "zoo.csv", "zoo.md"):
        os.replace(tmp / name, args.out / name)
    tmp.rmdir()
    print("\n".join(lines[:1]))
    print(f"written to {args.out}/")


if __name__ == "__main__":
    main()

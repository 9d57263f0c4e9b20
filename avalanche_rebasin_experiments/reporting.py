"""Tables, CSV and plots from the harness's run records (mean ± std over seeds)."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot", "summarize", "write_files", "write_metrics_csv"]

Record = dict[str, Any]
REPORTS = ("rebasin_reports", "interpolation_reports")  # per-experience reports with units_moved
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*", "h", "p")


def _names(records: list[Record], order: list[str]) -> list[str]:
    """Strategies in ``order`` first, then any other recorded ones (runs kept from earlier calls)."""
    seen = [r["strategy"] for r in records]
    return [n for n in order if n in seen] + sorted(set(seen) - set(order), key=seen.index)


def _cell(values: list[float], fmt: str) -> str:
    """Mean ± sample std over seeds; one seed prints its value alone (no fake spread)."""
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


def summarize(records: list[Record], order: list[str]) -> str:
    lines = [
        "| strategy | accuracy % | forgetting | train s / exp | units moved / exp | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for name in _names(records, order):
        runs = [r for r in records if r["strategy"] == name]
        reports = [rep for r in runs for key in REPORTS for rep in r.get(key, [])]
        moved = "—"
        if reports:
            moved = (
                f"{statistics.mean(rep['units_moved'] for rep in reports):.1f} / {reports[0]['units_total']}"
            )
        acc = _cell([100 * r["final_acc"] for r in runs], ".2f")
        fgt = _cell([r["final_forgetting"] for r in runs], ".3f")
        sec = _cell([r["train_seconds_per_exp"] for r in runs], ".2f")
        lines.append(f"| {name} | {acc} | {fgt} | {sec} | {moved} | {len(runs)} |")
    seeds = sorted({r["seed"] for r in records})
    threads = {r.get("provenance", {}).get("threads") for r in records}
    timing = (
        f"with {threads.pop()} compute thread(s)"
        if len(threads) == 1 and None not in threads
        else "thread count not recorded for every run"
    )
    return "\n".join(lines) + (
        f"\n\nSeeds {seeds}; accuracy and forgetting after the last experience, on the whole test stream. "
        f"Train time: wall clock of `strategy.train` ({timing}); machine load not controlled."
    )


def write_metrics_csv(records: list[Record], path: Path) -> None:
    header = ["strategy", "seed", "after_experience", "stream_accuracy", "stream_forgetting"]
    header += ["test_experience", "experience_accuracy"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in records:
            for row in r["history"]:
                for e, a in row["per_exp"].items():
                    w.writerow([r["strategy"], r["seed"], row["after"], row["acc"], row["forgetting"], e, a])


def write_files(
    records: list[Record], args_json: dict[str, Any], order: list[str], folder: Path, title: str
) -> None:
    """Write every output of a results folder into ``folder``: runs.json, metrics.csv, summary.md
    and the plots (the caller stages and moves them, see :mod:`.results_folder`)."""
    (folder / "runs.json").write_text(json.dumps({"args": args_json, "runs": records}, indent=1))
    write_metrics_csv(records, folder / "metrics.csv")
    (folder / "summary.md").write_text(summarize(records, order) + "\n")
    plot(records, order, folder, title)


def _style(i: int, n: int) -> dict[str, Any]:
    """A distinct colour and marker for strategy ``i`` of ``n`` (any ``n``)."""
    import matplotlib.pyplot as plt

    palette = [plt.cm.tab10(k) for k in range(10)] + [plt.cm.Dark2(k) for k in range(8)]
    colour = palette[i] if n <= len(palette) else plt.cm.turbo(0.05 + 0.9 * i / max(n - 1, 1))
    return {"color": colour, "marker": MARKERS[i % len(MARKERS)]}


def _over_seeds(by_name: dict[str, list[Record]], spread: str = "mean") -> str:
    seeds = sorted({r["seed"] for runs in by_name.values() for r in runs})
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"{spread} over seeds {seeds}"


def _figsize(names: list[str]) -> tuple[float, float]:
    """Room for the plot plus a legend of ``names`` beside it (long tokens, many strategies)."""
    longest = max((len(n) for n in names), default=10)
    return 6.5 + 0.075 * longest, max(5.0, 0.3 * len(names) + 1.0)


def _is_joint(runs: list[Record]) -> bool:
    return all(len(r["history"]) == 1 for r in runs)


def plot(records: list[Record], order: list[str], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    names = _names(records, order)
    by_name = {n: [r for r in records if r["strategy"] == n] for n in names}
    _plot_curve(by_name, out, title)
    _plot_matrices({n: runs for n, runs in by_name.items() if not _is_joint(runs)}, out, title)
    _plot_tradeoff(by_name, out, title)


def _plot_curve(by_name: dict[str, list[Record]], out: Path, title: str) -> None:
    """Stream accuracy after each experience, mean over seeds with a ±std band; Joint as a line."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=_figsize(list(by_name)))
    n_exp = 1
    for i, (name, runs) in enumerate(by_name.items()):
        style = _style(i, len(by_name))
        acc = np.array([[100 * row["acc"] for row in r["history"]] for r in runs])
        if _is_joint(runs):
            ax.axhline(acc.mean(), color="black", linestyle="--", linewidth=1, label=f"{name} (reference)")
            continue
        x = np.arange(1, acc.shape[1] + 1)
        n_exp = max(n_exp, acc.shape[1])
        ax.plot(x, acc.mean(0), label=name, markersize=4, linewidth=1.2, **style)
        if len(runs) > 1:
            ax.fill_between(
                x,
                acc.mean(0) - acc.std(0, ddof=1),
                acc.mean(0) + acc.std(0, ddof=1),
                color=style["color"],
                alpha=0.12,
            )
    ax.set_xticks(range(1, n_exp + 1, max(1, math.ceil(n_exp / 20))))
    ax.set_xlim(0.5, n_exp + 0.5)
    ax.set_xlabel("experiences trained")
    ax.set_ylabel("accuracy % on the whole test stream")
    ax.set_title(
        f"{title}: accuracy as training proceeds ({_over_seeds(by_name, 'mean ± std')})", fontsize=10
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(out / "accuracy_curve.png", dpi=130, bbox_inches="tight")
    plt.close(fig)


def _plot_matrices(by_name: dict[str, list[Record]], out: Path, title: str) -> None:
    """Accuracy on test experience j after training experience i, mean over seeds, one panel per
    strategy in a grid, a shared colourbar and the values printed where they stay legible."""
    import matplotlib.pyplot as plt

    if not by_name:
        return
    cols = min(4, len(by_name))
    rows = math.ceil(len(by_name) / cols)
    titles = {name: panel_title(name) for name in by_name}
    extra_lines = max(t.count("\n") for t in titles.values())
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.4 * cols + 0.8, (3.2 + 0.2 * extra_lines) * rows), squeeze=False
    )
    image = None
    for k, (ax, (name, runs)) in enumerate(zip(axes.flat, by_name.items())):
        matrix = np.nanmean([_matrix(r) for r in runs], axis=0) * 100
        n_train, n_test = matrix.shape
        image = ax.imshow(matrix, vmin=0, vmax=100, cmap="viridis")
        if n_train * n_test <= 100:
            for (i, j), v in np.ndenumerate(matrix):
                ax.text(
                    j,
                    i,
                    f"{v:.0f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if v < 60 else "black",
                )
        step = max(1, math.ceil(n_test / 10))
        ax.set_xticks(range(0, n_test, step), [str(k + 1) for k in range(0, n_test, step)], fontsize=7)
        ax.set_yticks(range(0, n_train, step), [str(k + 1) for k in range(0, n_train, step)], fontsize=7)
        ax.set_title(titles[name], fontsize=8)
        if k % cols == 0:
            ax.set_ylabel("after training experience", fontsize=8)
        if k + cols >= len(by_name):  # the lowest panel of its column
            ax.set_xlabel("test experience", fontsize=8)
    for ax in list(axes.flat)[len(by_name) :]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=0.8, label="accuracy %")
    fig.suptitle(f"{title}: accuracy matrix ({_over_seeds(by_name)})", fontsize=11)
    fig.savefig(out / "accuracy_matrix.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def panel_title(name: str, width: int = 24) -> str:
    """A strategy token broken after ``+`` so that no line is wider than ``width`` (a part
    longer than that stays whole)."""
    lines: list[str] = []
    for part in name.split("+"):
        if lines and len(lines[-1]) + 1 + len(part) <= width:
            lines[-1] += "+" + part
        else:
            lines.append(part)
    return "+\n".join(lines)


def _matrix(run: Record) -> np.ndarray:
    history = run["history"]
    matrix = np.full((len(history), len(history[-1]["per_exp"])), np.nan)
    for i, row in enumerate(history):
        for e, a in row["per_exp"].items():
            matrix[i, int(e)] = a
    return matrix


def _plot_tradeoff(by_name: dict[str, list[Record]], out: Path, title: str) -> None:
    """Final accuracy against final forgetting, mean ± std over seeds, one point per strategy."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=_figsize(list(by_name)))
    for i, (name, runs) in enumerate(by_name.items()):
        acc = [100 * r["final_acc"] for r in runs]
        fgt = [r["final_forgetting"] for r in runs]
        spread = len(runs) > 1
        ax.errorbar(
            statistics.mean(fgt), statistics.mean(acc),
            xerr=statistics.stdev(fgt) if spread else None, yerr=statistics.stdev(acc) if spread else None,
            linestyle="none", markersize=8, capsize=3, label=name, **_style(i, len(by_name)),
        )  # fmt: skip
    ax.set_xlabel("forgetting after the last experience (lower is better)")
    ax.set_ylabel("final accuracy % on the whole test stream (higher is better)")
    ax.set_title(f"{title}: accuracy vs forgetting ({_over_seeds(by_name, 'mean ± std')})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5), markerscale=0.9)
    fig.savefig(out / "accuracy_vs_forgetting.png", dpi=130, bbox_inches="tight")
    plt.close(fig)

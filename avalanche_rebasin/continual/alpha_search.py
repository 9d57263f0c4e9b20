"""Choosing the interpolation weight α on held-out samples, without a validation split.

At each commit every candidate ``α`` of a small grid gives a network
``θ(α) = (1 − α)·θ_old + α·π(θ_new)``; the chosen one maximises the experience-balanced
accuracy on samples no network was trained on,

    α* = argmax_α (1/E) Σ_e acc(θ(α); H_e),

where ``H_e`` are the held-out samples of experience ``e`` (the current one included), so
old and new experiences count alike, as the stream's final average accuracy counts them.
Held-out sets are small, so accuracies tie often: ties go to the lower experience-balanced
cross-entropy, then to the smaller α (the more stable commit). The cost is one forward pass over the
held-out samples per candidate, plus whatever ``build`` spends (a BatchNorm re-estimation).
This module is torch only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["ALPHA_GRID", "AlphaSearch", "balanced_accuracy", "balanced_scores", "choose_alpha"]

#: the candidates of ``alpha="auto"``: the trained network (1.0), even mixes, and the
#: stability side down to 0.2
ALPHA_GRID: tuple[float, ...] = (0.2, 0.4, 0.5, 0.6, 0.8, 1.0)


@dataclass
class AlphaSearch:
    """The chosen α, every candidate's held-out accuracy and cross-entropy, and the seconds
    the search took."""

    alpha: float
    accuracies: dict[float, float] = field(default_factory=dict)
    losses: dict[float, float] = field(default_factory=dict)
    seconds: float = 0.0
    samples: int = 0


def balanced_accuracy(model: nn.Module, groups: Sequence[Sequence[tuple[Any, Any]]]) -> float:
    """Mean over ``groups`` (one per experience, each a list of ``(x, y)`` batches) of the
    model's accuracy on that group, in eval mode; the model's mode is restored."""
    return balanced_scores(model, groups)[0]


@torch.no_grad()
def balanced_scores(model: nn.Module, groups: Sequence[Sequence[tuple[Any, Any]]]) -> tuple[float, float]:
    """Experience-balanced accuracy and mean cross-entropy (see :func:`balanced_accuracy`)."""
    was_training = model.training
    model.eval()
    try:
        accuracies, losses = [], []
        for batches in groups:
            correct = total = 0
            loss = 0.0
            for x, y in batches:
                out = model(x)
                correct += int((out.argmax(-1) == y).sum())
                loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
                total += len(y)
            if total:
                accuracies.append(correct / total)
                losses.append(loss / total)
    finally:
        model.train(was_training)
    if not accuracies:
        return float("nan"), float("nan")
    return sum(accuracies) / len(accuracies), sum(losses) / len(losses)


def choose_alpha(
    candidates: Sequence[float],
    build: Callable[[float], nn.Module],
    groups: Sequence[Sequence[tuple[Any, Any]]],
) -> AlphaSearch:
    """The candidate whose network ``build(α)`` scores best on ``groups``
    (:func:`balanced_accuracy`); ties to the lower cross-entropy, then the smaller α."""
    if not candidates:
        raise ValueError("choose_alpha: give at least one candidate α.")
    if not any(len(y) for batches in groups for _, y in batches):
        raise ValueError("choose_alpha: no held-out samples to choose α on.")
    start = time.perf_counter()
    scores = {float(a): balanced_scores(build(float(a)), groups) for a in sorted(set(candidates))}
    alpha = max(scores, key=lambda a: (scores[a][0], -scores[a][1], -a))
    samples = sum(len(y) for batches in groups for _, y in batches)
    return AlphaSearch(
        alpha,
        {a: acc for a, (acc, _) in scores.items()},
        {a: loss for a, (_, loss) in scores.items()},
        time.perf_counter() - start,
        samples,
    )

"""Re-basin costs, all functional: they read parameter dicts and never modify a model.

With ``θ_A``, ``θ_B`` two parameter dicts, ``π_P`` a (soft) permutation and ``C`` a
task loss evaluated with :func:`torch.func.functional_call`:

* ``C_L2(P) = ‖θ_A − π_P(θ_B)‖²`` (also L1 and cosine distances): weight alignment;
* ``C_Mid(P) = C((θ_A + π_P(θ_B)) / 2)``: task loss at the midpoint;
* ``C_Rnd(P) = C((1−λ)θ_A + λ π_P(θ_B))``, ``λ ~ U(0, 1)`` drawn each step;
* ``C_CL(δ, P; θ) = C((θ + π_P(θ)) / 2 + δ) + β‖δ‖²``: incremental learning.

A cost is any callable ``cost(theta_a, theta_b_permuted, batch) -> scalar tensor``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from .state import LossFn, State, functional_loss, interpolate_state

__all__ = [
    "CosineCost",
    "Cost",
    "L1Cost",
    "L2Cost",
    "MidpointCost",
    "RandomPointCost",
    "continual_cost",
]

Cost = Callable[[State, State, Any], Tensor]
@dataclass
class _WeightCost:
    keys: Sequence[str] | None = None  # tensors compared (default: every floating tensor)

    def _pairs(self, a: State, b: State) -> list[tuple[Tensor, Tensor]]:
        keys = self.keys if self.keys is not None else [k for k, v in a.items() if v.is_floating_point()]
        return [(a[k], b[k]) for k in keys]


@dataclass
class L2Cost(_WeightCost):
    """``Σ_k ‖a_k − b_k‖²``."""

    def __call__(self, a: State, b: State, batch: Any = None) -> Tensor:
        return cast(Tensor, sum(((x - y) ** 2).sum() for x, y in self._pairs(a, b)))


@dataclass
class L1Cost(_WeightCost):
    """``Σ_k |a_k − b_k|₁``."""

    def __call__(self, a: State, b: State, batch: Any = None) -> Tensor:
        return cast(Tensor, sum((x - y).abs().sum() for x, y in self._pairs(a, b)))


@dataclass
class CosineCost(_WeightCost):
    """``1 − ⟨a, b⟩ / (‖a‖‖b‖)`` over the concatenated tensors."""

    def __call__(self, a: State, b: State, batch: Any = None) -> Tensor:
        pairs = self._pairs(a, b)
        dot = sum((x * y).sum() for x, y in pairs)
        na = cast(Tensor, sum((x * x).sum() for x, _ in pairs)).sqrt()
        nb = cast(Tensor, sum((y * y).sum() for _, y in pairs)).sqrt()
        return 1 - dot / (na * nb)


@dataclass
class MidpointCost:
    """``C_Mid``: task loss of ``model`` at ``(θ_A + π_P(θ_B)) / 2``."""

    model: nn.Module
    loss_fn: LossFn = nn.functional.cross_entropy

    def __call__(self, a: State, b: State, batch: Any) -> Tensor:
        return functional_loss(self.model, interpolate_state(a, b, 0.5), batch, self.loss_fn)


@dataclass
class RandomPointCost:
    """``C_Rnd``: task loss at ``(1−λ)θ_A + λπ_P(θ_B)`` with ``λ ~ U(0, 1)`` each call."""

    model: nn.Module
    loss_fn: LossFn = nn.functional.cross_entropy
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))

    def __call__(self, a: State, b: State, batch: Any) -> Tensor:
        alpha = float(torch.rand((), generator=self.generator))
        return functional_loss(self.model, interpolate_state(a, b, alpha), batch, self.loss_fn)


def continual_cost(
    model: nn.Module,
    theta: State,
    theta_permuted: State,
    delta: State,
    batch: Any,
    loss_fn: LossFn,
    beta: float,
) -> Tensor:
    """``C_CL = C((θ + π_P(θ)) / 2 + δ) + β‖δ‖²``; ``delta`` may cover a subset of ``θ``."""
    merged = interpolate_state(theta, theta_permuted, 0.5)
    for k, d in delta.items():
        merged[k] = merged[k] + d
    penalty = sum((d**2).sum() for d in delta.values()) if delta else 0.0
    return functional_loss(model, merged, batch, loss_fn) + beta * penalty

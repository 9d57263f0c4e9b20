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

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .model_inputs import call_with_state

__all__ = [
    "CosineCost",
    "Cost",
    "L1Cost",
    "L2Cost",
    "MidpointCost",
    "RandomPointCost",
    "continual_cost",
    "functional_loss",
    "interpolate_state",
]

State = Mapping[str, Tensor]
Cost = Callable[[State, State, Any], Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every entry of ``tensors`` is finite, read from one sum per tensor and a single
    host synchronisation. A sum that overflows reads as non-finite, which only sends
    :func:`mix` down its careful path."""
    sums = [t.detach().sum().float() for t in tensors if t.numel()]
    if not sums:
        return True
    device = sums[0].device
    return bool(torch.isfinite(torch.stack([s.to(device) for s in sums])).all())


def mix(a: Tensor, b: Tensor, weight: float | Tensor, *, finite: bool = False) -> Tensor:
    """``(1−w)·a + w·b``. Where an infinite entry would make the formula NaN (a mask's
    ``-inf`` on both sides, ``0·∞`` at ``w`` = 0 or 1) the entry of the nearer side is kept.
    ``finite=True`` says the caller has checked that ``a`` and ``b`` are finite."""
    out = torch.lerp(a, b, weight)
    if finite or all_finite((a, b)):
        return out
    nearer = torch.where(torch.as_tensor(weight, device=a.device) <= 0.5, a, b)
    return torch.where(torch.isnan(out) & ~torch.isnan(a) & ~torch.isnan(b), nearer, out)


def interpolate_state(a: State, b: State, lam: float | Tensor | Mapping[str, float]) -> dict[str, Tensor]:
    """``(1−λ)·a + λ·b`` for floating tensors (see :func:`mix`; ``lam`` may map every tensor
    name to its own λ); integer buffers from ``a``. One finiteness check for the whole state."""
    floating = [k for k, v in a.items() if v.is_floating_point()]
    finite = all_finite([*(a[k] for k in floating), *(b[k] for k in floating)])
    return {
        k: mix(v, b[k], lam[k] if isinstance(lam, Mapping) else lam, finite=finite)
        if v.is_floating_point()
        else v
        for k, v in a.items()
    }


def functional_loss(model: nn.Module, state: State, batch: Any, loss_fn: LossFn) -> Tensor:
    """``loss_fn(model_θ(x), y)`` for ``batch = (x, y, ...)`` with ``θ = state``.

    Buffers in ``state`` are cloned first, so a model in training mode updates only
    those copies (``functional_call`` writes BatchNorm statistics in place).
    """
    x, y = batch[0], batch[1]
    buffers = {name for name, _ in model.named_buffers()}
    state = {k: v.detach().clone() if k in buffers else v for k, v in state.items()}
    return loss_fn(call_with_state(model, state, x), y)


@dataclass
class _WeightCost:
    keys: Sequence[str] | None = None  # tensors compared (default: every floating tensor)

    def _pairs(self, a: State, b: State):
        keys = self.keys if self.keys is not None else [k for k, v in a.items() if v.is_floating_point()]
        return [(a[k], b[k]) for k in keys]


@dataclass
class L2Cost(_WeightCost):
    """``Σ_k ‖a_k − b_k‖²``."""

    def __call__(self, a: State, b: State, batch: Any = None) -> Tensor:
        return sum(((x - y) ** 2).sum() for x, y in self._pairs(a, b))


@dataclass
class L1Cost(_WeightCost):
    """``Σ_k |a_k − b_k|₁``."""

    def __call__(self, a: State, b: State, batch: Any = None) -> Tensor:
        return sum((x - y).abs().sum() for x, y in self._pairs(a, b))


@dataclass
class CosineCost(_WeightCost):
    """``1 − ⟨a, b⟩ / (‖a‖‖b‖)`` over the concatenated tensors."""

    def __call__(self, a: State, b: State, batch: Any = None) -> Tensor:
        pairs = self._pairs(a, b)
        dot = sum((x * y).sum() for x, y in pairs)
        na = sum((x * x).sum() for x, _ in pairs).sqrt()
        nb = sum((y * y).sum() for _, y in pairs).sqrt()
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
        lam = float(torch.rand((), generator=self.generator))
        return functional_loss(self.model, interpolate_state(a, b, lam), batch, self.loss_fn)


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

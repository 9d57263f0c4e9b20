"""Linear mode connectivity: interpolation, loss barrier and area under the curve.

For a metric ``C`` along ``θ(λ) = (1−λ)θ_A + λθ_B``:

    Barrier = sup_λ [C(θ(λ)) − ((1−λ)C(θ_A) + λC(θ_B))],
    AUC     = ∫₀¹ [C(θ(λ)) − ((1−λ)C(θ_A) + λC(θ_B))] dλ   (trapezoid rule).

For a metric where higher is better (accuracy) the sign flips, so a barrier is always
how much worse the path is than the straight line between its ends. Networks with
BatchNorm need their running statistics re-estimated on training data at every
interpolated point (``bn_data``), since averaged statistics do not describe the
averaged network.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.model_inputs import call_model, to_device
from ..core.state import interpolate_state, load_state_, model_state, private_copy
from ..core.validation import check_integer, check_real
from .inputs import check_same_architecture, known_empty

__all__ = ["LMCCurve", "barrier_and_auc", "interpolate", "lmc_curve", "reestimate_batchnorm"]


def interpolate(model_a: nn.Module, model_b: nn.Module, alpha: float) -> nn.Module:
    """A new module with ``(1−α)θ_A + αθ_B`` (counters from the nearer endpoint, see
    :func:`~avalanche_rebasin.core.state.interpolate_state`).

    Raises ``ValueError`` naming the first tensor whose name or shape differs.
    """
    if not isinstance(alpha, torch.Tensor):
        check_real("alpha", alpha)
    state_a, state_b = model_state(model_a), model_state(model_b)
    check_same_architecture(state_a, state_b)
    return load_state_(private_copy(model_a), interpolate_state(state_a, state_b, float(alpha)))


@torch.no_grad()
def reestimate_batchnorm(
    model: nn.Module,
    data: Iterable,
    *,
    max_batches: int | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> nn.Module:
    """Reset and re-estimate every BatchNorm's running statistics on ``data`` (in place).

    Uses a cumulative average over the batches (``momentum=None``); ``data`` yields
    ``x`` or ``(x, y, ...)``, fed as ``model(x)`` unless ``forward(model, batch)`` is
    given (e.g. to pass task labels). Restores the model's mode and momenta, also on
    error; returns ``model``.
    """
    check_integer("max_batches", max_batches, 1, optional=True)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    was_training = model.training
    momenta = [m.momentum for m in norms]
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    device = first.device if first is not None else None  # no tensors: leave the input where it is

    def default_forward(module: nn.Module, batch: Any) -> Any:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return call_model(module, to_device(x, device) if device is not None else x)

    forward = forward or default_forward
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        for i, batch in enumerate(data):
            if max_batches is not None and i >= max_batches:
                break
            forward(model, batch)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return model


def barrier_and_auc(
    alphas: list[float], values: list[float], *, higher_is_better: bool = False
) -> tuple[float, float]:
    """Barrier and AUC of ``values`` at the weights ``alphas`` against the straight line
    between the endpoints."""
    weight = torch.tensor(alphas, dtype=torch.float64)
    val = torch.tensor(values, dtype=torch.float64)
    line = (1 - weight) * val[0] + weight * val[-1]
    gap = (line - val) if higher_is_better else (val - line)
    return float(gap.max()), float(torch.trapezoid(gap, weight))


@dataclass
class LMCCurve:
    """A metric along the linear path from ``model_a`` (α = 0) to ``model_b`` (α = 1)."""

    alphas: list[float]
    values: list[float]
    barrier: float
    auc: float
    higher_is_better: bool = False

    @property
    def lambdas(self) -> list[float]:
        """Deprecated name of :attr:`alphas`."""
        warnings.warn("LMCCurve.lambdas is deprecated; read alphas.", DeprecationWarning, stacklevel=2)
        return self.alphas


def lmc_curve(
    model_a: nn.Module,
    model_b: nn.Module,
    eval_fn: Callable[[nn.Module], float],
    *,
    n_points: int = 11,
    bn_data: Iterable | None = None,
    higher_is_better: bool = False,
    progress: bool = False,
) -> LMCCurve:
    """Evaluate ``eval_fn`` on ``n_points`` evenly spaced interpolations.

    ``eval_fn(model) -> float`` (e.g. test loss or accuracy) gets a fresh module in eval
    mode. With ``bn_data`` every interpolated network's BatchNorm statistics are
    re-estimated first (endpoints included, for a fair line); a one-shot iterator
    (generator) as ``bn_data`` is read once into a list so that every point sees the same
    batches. Neither model is modified. Raises ``ValueError`` for empty ``bn_data``.
    """
    check_integer("n_points", n_points, 2)
    check_same_architecture(model_state(model_a), model_state(model_b))
    if isinstance(bn_data, Iterator):
        bn_data = list(bn_data)
    if bn_data is not None and known_empty(bn_data):
        raise ValueError("bn_data yielded no batches; pass at least one batch to re-estimate BatchNorm on.")
    alphas = torch.linspace(0, 1, n_points).tolist()
    values = []
    for alpha in tqdm(alphas, desc="lmc", disable=not progress, leave=False):
        model = interpolate(model_a, model_b, alpha)
        if bn_data is not None:
            reestimate_batchnorm(model, bn_data)
        model.eval()
        values.append(float(eval_fn(model)))
    barrier, auc = barrier_and_auc(alphas, values, higher_is_better=higher_is_better)
    return LMCCurve(alphas, values, barrier, auc, higher_is_better)

"""State dicts: read a model's tensors, copy them in, copy a model safely, and the one
convex combination every method uses.

A state is a mapping from parameter/buffer names to tensors. The convex combination
``(1−α)·a + α·b`` mixes floating tensors only; integer buffers (BatchNorm's
``num_batches_tracked``) are counters, not coordinates, and are taken from one endpoint.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .model_inputs import call_with_state

__all__ = [
    "LossFn",
    "State",
    "all_finite",
    "functional_loss",
    "interpolate_state",
    "load_state_",
    "mix",
    "model_state",
    "private_copy",
]

State = Mapping[str, Tensor]


LossFn = Callable[[Tensor, Tensor], Tensor]



def model_state(model: nn.Module) -> dict[str, Tensor]:
    """All named parameters and buffers (non-persistent buffers included), detached."""
    return {name: t.detach() for name, t in [*model.named_parameters(), *model.named_buffers()]}


def private_copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, checked to share no tensor with ``model`` (a module whose
    ``__deepcopy__`` returns ``self`` would otherwise let a "copy" write into the original)."""
    try:
        duplicate = copy.deepcopy(model)
    except Exception as error:
        raise TypeError(
            f"This needs a deep copy of the model, and copying {type(model).__name__} failed "
            f"({type(error).__name__}: {error}); make the module deep-copyable."
        ) from error
    own = {t.data_ptr() for t in [*model.parameters(), *model.buffers()] if t.numel()}
    named = [*duplicate.named_parameters(), *duplicate.named_buffers()]
    shared = [n for n, t in named if t.numel() and t.data_ptr() in own]
    if shared:
        raise TypeError(
            f"copy.deepcopy of the model shares '{shared[0]}' with the original (a __deepcopy__ "
            "returning self?), so a permuted or interpolated copy would write into your model; "
            "make the module deep-copyable."
        )
    return duplicate


def load_state_(model: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """Copy ``state`` into ``model``'s parameters and buffers, in place; returns ``model``."""
    targets = dict([*model.named_parameters(), *model.named_buffers()])
    with torch.no_grad():
        for name, value in state.items():
            if name not in targets:
                raise KeyError(f"Model has no parameter or buffer named '{name}'.")
            targets[name].copy_(value)
    return model


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every entry of ``tensors`` is finite, read from one sum per tensor and a single
    host synchronisation. A sum that overflows reads as non-finite, which only sends
    :func:`mix` down its careful path."""
    sums = [t.detach().sum().float() for t in tensors if t.numel()]
    if not sums:
        return True
    device = sums[0].device
    return bool(torch.isfinite(torch.stack([s.to(device) for s in sums])).all())


def mix(a: Tensor, b: Tensor, alpha: float | Tensor, *, finite: bool = False) -> Tensor:
    """``(1−α)·a + α·b``. Where an infinite entry would make the formula NaN (a mask's
    ``-inf`` on both sides, ``0·∞`` at α = 0 or 1) the entry of the nearer endpoint is kept
    (``a`` up to α = ½, else ``b``). ``finite=True`` says the caller has checked that ``a``
    and ``b`` are finite."""
    out = torch.lerp(a, b, alpha)
    if finite or all_finite((a, b)):
        return out
    nearer = torch.where(torch.as_tensor(alpha, device=a.device) <= 0.5, a, b)
    return torch.where(torch.isnan(out) & ~torch.isnan(a) & ~torch.isnan(b), nearer, out)


def interpolate_state(
    a: State, b: State, alpha: float | Tensor | Mapping[str, float], *, keep: Collection[str] = ()
) -> dict[str, Tensor]:
    """The convex combination ``(1−α)·a + α·b`` of two states, the one every method uses.

    Floating tensors are mixed (:func:`mix`; ``alpha`` a number or one per tensor name).
    Every other tensor is a counter (BatchNorm's ``num_batches_tracked``) and comes from the
    nearer endpoint, ``a`` up to α = ½ and ``b`` above, so both ends are exact. The
    tensors named in ``keep`` (frozen parameters) come from ``a`` unchanged. One finiteness
    check for the whole state.
    """
    floating = [k for k, v in a.items() if v.is_floating_point() and k not in keep]
    finite = all_finite([*(a[k] for k in floating), *(b[k] for k in floating)])
    out = {}
    for name, value in a.items():
        weight = alpha[name] if isinstance(alpha, Mapping) else alpha
        if name in keep:
            out[name] = value.clone()
        elif value.is_floating_point():
            out[name] = mix(value, b[name], weight, finite=finite)
        else:
            out[name] = (value if float(weight) <= 0.5 else b[name]).clone()
    return out


def functional_loss(model: nn.Module, state: State, batch: Any, loss_fn: LossFn) -> Tensor:
    """``loss_fn(model_θ(x), y)`` for ``batch = (x, y, ...)`` with ``θ = state``.

    Buffers in ``state`` are cloned first, so a model in training mode updates only
    those copies (``functional_call`` writes BatchNorm statistics in place).
    """
    x, y = batch[0], batch[1]
    buffers = {name for name, _ in model.named_buffers()}
    state = {k: v.detach().clone() if k in buffers else v for k, v in state.items()}
    return loss_fn(call_with_state(model, state, x), y)

"""Argument checks shared by every entry point: a clear error that names the argument,
raised before any work is done."""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["check_finite", "check_integer", "check_real"]


def check_integer(name: str, value: Any, low: int, *, optional: bool = False) -> None:
    """``TypeError`` unless ``value`` is an integer (not a bool; ``None`` if ``optional``),
    ``ValueError`` if it is below ``low``; both name the argument."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        none = " or None" if optional else ""
        raise TypeError(f"{name} must be an integer >= {low}{none}, got {value!r} ({type(value).__name__}).")
    if value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")


def check_real(name: str, value: Any, low: float | None = None, *, strict: bool = False) -> None:
    """``TypeError`` unless ``value`` is a real number (not a bool), ``ValueError`` unless it
    is finite and, given ``low``, ``> low`` (``strict``) or ``>= low``; both name the argument."""
    rule = "a finite number" + ("" if low is None else f" {'>' if strict else '>='} {low:g}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {rule}, got {value!r} ({type(value).__name__}).")
    below = low is not None and (value <= low if strict else value < low)
    if not math.isfinite(value) or below:
        raise ValueError(f"{name} must be {rule}, got {value!r}.")


def check_finite(state: Mapping[str, Tensor], label: str, masks: Collection[str] = ()) -> None:
    """Raise ``ValueError`` at the first NaN or infinity; in ``masks`` (buffers, where ``±inf``
    marks masked positions) only at a NaN."""
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        mask = name in masks
        if torch.isnan(tensor).any() if mask else not torch.isfinite(tensor).all():
            what = "NaN values" if mask else "NaN or infinite values"
            raise ValueError(
                f"{label} has {what} in '{name}'; re-basin needs finite weights (check the training "
                "run that produced them)."
            )



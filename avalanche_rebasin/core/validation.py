"""Argument checks shared by every entry point: a clear error that names the argument,
raised before any work is done."""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ArgumentTypeError",
    "check_bool", "check_choice", "check_finite", "check_integer", "check_real"]


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type. A ``TypeError``, and a ``ValueError`` as well, since
    some settings (the Sinkhorn solver's, Re-basin's) reported every bad value as one."""


def check_integer(name: str, value: Any, low: int, *, optional: bool = False) -> None:
    """``TypeError`` unless ``value`` is an integer (not a bool; ``None`` if ``optional``),
    ``ValueError`` if it is below ``low``; both name the argument."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        none = " or None" if optional else ""
        kind = type(value).__name__
        raise ArgumentTypeError(f"{name} must be an integer >= {low}{none}, got {value!r} ({kind}).")
    if value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")


def check_real(name: str, value: Any, low: float | None = None, *, strict: bool = False) -> None:
    """``TypeError`` unless ``value`` is a real number (not a bool), ``ValueError`` unless it
    is finite and, given ``low``, ``> low`` (``strict``) or ``>= low``; both name the argument."""
    rule = "a finite number" + ("" if low is None else f" {'>' if strict else '>='} {low:g}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be {rule}, got {value!r} ({type(value).__name__}).")
    below = low is not None and (value <= low if strict else value < low)
    if not math.isfinite(value) or below:
        raise ValueError(f"{name} must be {rule}, got {value!r}.")


def check_choice(name: str, value: Any, choices: Collection[Any]) -> None:
    """``ValueError`` unless ``value`` is one of ``choices``, listing them."""
    if not any(value == c and type(value) is type(c) for c in choices):
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {listed}, got {value!r}.")


def check_bool(name: str, value: Any) -> None:
    """``TypeError`` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__}).")


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



"""Pickling a strategy's optimiser as plain data, so Avalanche's ``save_checkpoint`` works.

dill 0.4 pickles torch's optimiser classes by value and fails; a strategy's
``__getstate__``/``__setstate__`` pass their state through :func:`optimizer_as_data` and
:func:`optimizer_from_data`, which store the optimiser as class path, groups and state by
parameter name.

:func:`atomic_save_checkpoint` is Avalanche's ``save_checkpoint`` written to a temporary file
beside the target and moved over it with ``os.replace``: a kill mid-save leaves the previous
checkpoint whole (Avalanche's own writes in place, and a truncated file then fails to load).
"""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["atomic_save_checkpoint", "optimizer_as_data", "optimizer_from_data"]


def atomic_save_checkpoint(
    strategy: Any, fname: str | os.PathLike[str], exclude: Collection[str] | None = None
) -> None:
    """``avalanche.checkpointing.save_checkpoint(strategy, fname, exclude)``, atomically: the
    file at ``fname`` is the previous checkpoint or the new one, never a part of either.

    Use it where you would call Avalanche's, e.g. after every ``strategy.train(exp)``; load
    with Avalanche's ``maybe_load_checkpoint`` as usual."""
    from avalanche.checkpointing import save_checkpoint

    target = Path(fname)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(descriptor)
    try:
        save_checkpoint(strategy, temporary, exclude=exclude)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def optimizer_as_data(state: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """A copy of a strategy's ``__dict__`` whose ``optimizer`` is an :class:`_OptimizerSnapshot`."""
    out = dict(state)
    out["optimizer"] = _OptimizerSnapshot.take(state["optimizer"], model)
    return out


def optimizer_from_data(state: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """The inverse of :func:`optimizer_as_data`: the optimiser rebuilt on ``model``'s parameters."""
    out = dict(state)
    if isinstance(out.get("optimizer"), _OptimizerSnapshot):
        out["optimizer"] = out["optimizer"].restore(model)
    return out


@dataclass
class _OptimizerSnapshot:
    """A torch optimiser as plain data: class path, groups and state by parameter name.

    Parameters the model no longer has (a head replaced by a grown one) are dropped.
    """

    class_path: str
    groups: list[dict[str, Any]]
    state: dict[str, Any]

    @classmethod
    def take(cls, optimizer: torch.optim.Optimizer, model: nn.Module) -> _OptimizerSnapshot:
        names = {id(p): n for n, p in model.named_parameters()}
        groups = [
            {
                **{k: v for k, v in g.items() if k != "params"},
                "params": [names[id(p)] for p in g["params"] if id(p) in names],
            }
            for g in optimizer.param_groups
        ]
        state = {names[id(p)]: s for p, s in optimizer.state.items() if id(p) in names}
        path = f"{type(optimizer).__module__}:{type(optimizer).__qualname__}"
        return cls(path, groups, state)

    def restore(self, model: nn.Module) -> torch.optim.Optimizer:
        module, _, name = self.class_path.partition(":")
        optimizer_cls = getattr(importlib.import_module(module), name)
        params = dict(model.named_parameters())
        groups = [{**g, "params": [params[n] for n in g["params"]]} for g in self.groups]
        optimizer = optimizer_cls(groups)
        for n, s in self.state.items():
            optimizer.state[params[n]] = s
        return optimizer

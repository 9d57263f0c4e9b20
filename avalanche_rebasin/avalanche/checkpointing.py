"""Pickling a strategy's optimiser as plain data, so Avalanche's ``save_checkpoint`` works.

dill 0.4 pickles torch's optimiser classes by value and fails; a strategy's
``__getstate__``/``__setstate__`` pass their state through :func:`optimizer_as_data` and
:func:`optimizer_from_data`, which store the optimiser as class path, groups and state by
parameter name.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["optimizer_as_data", "optimizer_from_data"]


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

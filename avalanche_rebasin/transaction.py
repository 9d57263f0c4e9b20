"""Every training experience of a plugin's method as a transaction.

Avalanche's templates have no hook for an exception: a plugin that swapped ``strategy.model``
for the network it trains, or that holds the weights an experience started from, would stay
half-switched after an error or a Ctrl-C inside the experience. :func:`guard_experiences`
wraps the three phases of an experience on the strategy object (``_before_training_exp``,
``_train_exp``, ``_after_training_exp``); on any exception, ``KeyboardInterrupt`` included,
every owner's ``rollback(strategy)`` runs, then the error propagates. ``commit()`` runs once
the last phase has returned; ``release_experiences`` (from ``after_training``) removes the
wrappers again.

:class:`ExperienceSnapshot` is what an owner keeps to roll back: the user's module (every
parameter and buffer), the state of the strategy's optimiser, its clock and its replay buffers
(every plugin's ``storage_policy``: a replay buffer updated before the error would otherwise
replay the failed experience's own samples when it is trained again) at the experience's start.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .permute import load_state_, model_state

__all__ = ["ExperienceSnapshot", "Transactional", "guard_experiences", "release_experiences"]

PHASES = ("_before_training_exp", "_train_exp", "_after_training_exp")


class Transactional(Protocol):
    def rollback(self, strategy: Any) -> None:
        """Return the strategy and the owner's own state to the experience's start."""

    def commit(self) -> None:
        """The experience finished: forget what :meth:`rollback` would restore."""


@dataclass
class ExperienceSnapshot:
    """The user's module, the strategy's optimiser, clock and replay buffers as an experience
    found them."""

    module: nn.Module
    state: dict[str, Tensor]
    optimizer: torch.optim.Optimizer | None
    optimizer_state: dict[str, Any] | None
    attributes: list[tuple[Any, dict[str, Any]]]  # (object, a shallow copy of its attributes)

    @classmethod
    def take(cls, strategy: Any, module: nn.Module) -> ExperienceSnapshot:
        state = {k: v.detach().clone() for k, v in model_state(module).items()}
        optimizer = getattr(strategy, "optimizer", None)
        saved = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
        return cls(module, state, optimizer, saved, [(o, _attributes(o)) for o in _bookkeeping(strategy)])

    def restore(self) -> None:
        """Everything back to the snapshot (the module's tensors in place)."""
        with torch.no_grad():
            load_state_(self.module, self.state)
        if self.optimizer is not None and self.optimizer_state is not None:
            self.optimizer.load_state_dict(self.optimizer_state)
        for owner, attributes in self.attributes:
            vars(owner).clear()
            vars(owner).update(attributes)


def _bookkeeping(strategy: Any) -> list[Any]:
    """The strategy's clock, every plugin's storage policy and the groups of its buffer (Avalanche
    rebinds their attributes on update, so shallow copies of them are snapshots)."""
    found = [strategy.clock] if hasattr(strategy, "clock") else []
    for plugin in getattr(strategy, "plugins", []):
        policy = getattr(plugin, "storage_policy", None)
        if policy is not None and hasattr(policy, "__dict__"):
            found.append(policy)
            groups = getattr(policy, "buffer_groups", {})
            found += [g for g in groups.values() if hasattr(g, "__dict__")]
    return found


def _attributes(owner: Any) -> dict[str, Any]:
    return {k: dict(v) if isinstance(v, dict) else v for k, v in vars(owner).items()}


def guard_experiences(strategy: Any, owner: Transactional) -> None:
    """Wrap ``strategy``'s experience phases so that ``owner`` rolls back on any error.

    Called from a plugin's ``before_training``; a guard left from another strategy object (a
    copy restored from a checkpoint) is replaced."""
    for phase in PHASES:
        current = strategy.__dict__.get(phase)
        if isinstance(current, _GuardedPhase) and current.strategy is strategy:
            if not any(o is owner for o in current.owners):
                current.owners.append(owner)
            continue
        inner = current.inner if isinstance(current, _GuardedPhase) else current
        strategy.__dict__[phase] = _GuardedPhase(strategy, phase, [owner], inner)


def release_experiences(strategy: Any) -> None:
    """Remove the guards (from ``after_training``): nothing of them is pickled with a
    checkpoint taken between ``train()`` calls."""
    for phase in PHASES:
        current = strategy.__dict__.get(phase)
        if isinstance(current, _GuardedPhase):
            if current.inner is None:
                del strategy.__dict__[phase]
            else:
                strategy.__dict__[phase] = current.inner


class _GuardedPhase:
    """One phase of ``strategy``: the original call, with the owners' rollback on any error."""

    def __init__(self, strategy: Any, phase: str, owners: list[Transactional], inner: Any) -> None:
        self.strategy, self.phase, self.owners, self.inner = strategy, phase, owners, inner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = self.inner or getattr(type(self.strategy), self.phase).__get__(self.strategy)
        try:
            result = call(*args, **kwargs)
        except BaseException as error:
            for owner in self.owners:
                try:
                    owner.rollback(self.strategy)
                except Exception as failure:  # never hide the error that started it
                    error.add_note(f"rolling back {type(owner).__name__} failed too: {failure!r}")
            raise
        if self.phase == PHASES[-1]:
            for owner in self.owners:
                owner.commit()
        return result

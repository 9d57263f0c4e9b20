"""Every training experience of a plugin's method as a transaction.

Avalanche's templates have no hook for an exception: a plugin that swapped ``strategy.model``
for the network it trains, or that holds the weights an experience started from, would stay
half-switched after an error or a Ctrl-C inside the experience. :func:`guard_experiences`
wraps the three phases of an experience on the strategy object (``_before_training_exp``,
``_train_exp``, ``_after_training_exp``); on any exception, ``KeyboardInterrupt`` included,
every owner's ``rollback(strategy)`` runs, then the error propagates. ``commit()`` runs once
the last phase has returned; ``release_experiences`` (from ``after_training``) removes the
wrappers again.

:class:`ExperienceSnapshot` is what an owner keeps: the user's module (every parameter and
buffer) once the experience's model adaptation has run.
:class:`Bookkeeping` is what the guard keeps: Avalanche's own state (the clock, its plugins'
replay buffers, LwF's teacher, LR schedulers, DER's and ER-ACE's buffers) before the
experience's first phase (the model's structure and the optimiser included), restored after
the owners' rollbacks.
"""

from __future__ import annotations

import collections
import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..core.state import load_state_, model_state

__all__ = ["Bookkeeping", "ExperienceSnapshot", "Transactional", "guard_experiences", "release_experiences"]

PHASES = ("_before_training_exp", "_train_exp", "_after_training_exp")


class Transactional(Protocol):
    def rollback(self, strategy: Any) -> None:
        """Return the strategy and the owner's own state to the experience's start."""

    def commit(self) -> None:
        """The experience finished: forget what :meth:`rollback` would restore."""


@dataclass
class ExperienceSnapshot:
    """The user's module as an experience found it, taken by an owner once model adaptation has
    run (the optimiser, and the structure before adaptation, are :class:`Bookkeeping`'s)."""

    module: nn.Module
    state: dict[str, Tensor]

    @classmethod
    def take(cls, module: nn.Module) -> ExperienceSnapshot:
        return cls(module, {k: v.detach().clone() for k, v in model_state(module).items()})

    def restore(self) -> None:
        """The module's tensors back to the snapshot, in place."""
        with torch.no_grad():
            load_state_(self.module, self.state)


@dataclass
class Bookkeeping:
    """The strategy's state around an experience, taken before ``_before_training_exp`` runs.

    * The model's structure: every module's children, parameter and buffer objects and public
      attributes, so a head that model adaptation grows (``IncrementalClassifier`` puts a new
      ``Linear`` in place of the old, untouched one) is put back; restored only where they
      changed, so a model that did not grow keeps its parameter objects.
    * The optimiser's groups and state (Avalanche's ``reset_optimizer`` replaces both).
    * Avalanche's own state: the attributes of the clock, of every Avalanche plugin and of the
      objects they and the template hold (replay storage policies and their buffer groups,
      LwF's teacher, DER's and ER-ACE's buffers), one level of containers copied, and every LR
      scheduler's state. Avalanche rebinds these attributes on update, so shallow copies are
      snapshots. Plugins of other packages and the evaluator (what was logged stays logged) are
      not touched.
    """

    structure: list[tuple[nn.Module, dict[str, Any]]]
    optimizer: tuple[torch.optim.Optimizer, list[tuple[dict, dict]], Any] | None
    attributes: list[tuple[Any, dict[str, Any]]]
    schedulers: list[tuple[Any, dict[str, Any]]]

    @classmethod
    def take(cls, strategy: Any) -> Bookkeeping:
        model = getattr(strategy, "model", None)
        structure = [(m, _structure(m)) for m in model.modules()] if isinstance(model, nn.Module) else []
        optimizer = getattr(strategy, "optimizer", None)
        saved = None
        if isinstance(optimizer, torch.optim.Optimizer):
            groups = [(g, {**g, "params": list(g["params"])}) for g in optimizer.param_groups]
            state = collections.defaultdict(dict, {p: copy.deepcopy(v) for p, v in optimizer.state.items()})
            saved = (optimizer, groups, state)
        objects = _avalanche_state(strategy)
        schedulers = [
            (v, copy.deepcopy(v.state_dict()))
            for o in objects
            for v in vars(o).values()
            if isinstance(v, torch.optim.lr_scheduler.LRScheduler)
        ]
        return cls(structure, saved, [(o, _attributes(o)) for o in objects], schedulers)

    def restore(self) -> None:
        for module, recorded in self.structure:
            if not _same_structure(_structure(module), recorded):
                vars(module).update({k: dict(v) if isinstance(v, dict) else v for k, v in recorded.items()})
        if self.optimizer is not None:
            optimizer, groups, state = self.optimizer
            for group, content in groups:
                group.clear()
                group.update(content)
            optimizer.param_groups[:] = [group for group, _ in groups]
            optimizer.state = state
        for owner, attributes in self.attributes:
            vars(owner).clear()
            vars(owner).update(attributes)
        for scheduler, state in self.schedulers:
            scheduler.load_state_dict(state)


def _structure(module: nn.Module) -> dict[str, Any]:
    """What model adaptation may rebind: the module's children, parameter and buffer objects
    and its public plain attributes."""
    public = {k: v for k, v in vars(module).items() if not k.startswith("_")}
    plain = {k: v for k, v in public.items() if isinstance(v, int | float | str)}
    return {**plain, **{k: dict(getattr(module, k)) for k in ("_modules", "_parameters", "_buffers")}}


def _same_structure(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal plain attributes, and the same objects (by identity) as children, parameters, buffers."""
    if a.keys() != b.keys():
        return False
    for key, value in a.items():
        if isinstance(value, dict):
            other = b[key]
            if value.keys() != other.keys() or any(value[k] is not other[k] for k in value):
                return False
        elif value != b[key]:
            return False
    return True


def _is_avalanche_state(value: Any) -> bool:
    excluded = (nn.Module, Tensor, torch.optim.Optimizer, torch.utils.data.Dataset)
    module = type(value).__module__
    return (
        hasattr(value, "__dict__")
        and module.startswith("avalanche.")
        and not module.startswith(("avalanche.training.templates", "avalanche.training.plugins.evaluation"))
        and not module.startswith(("avalanche.benchmarks", "avalanche.logging", "avalanche.evaluation"))
        and not isinstance(value, excluded)
        and not hasattr(value, "plugins")  # a strategy
    )


def _avalanche_state(strategy: Any) -> list[Any]:
    """The clock, Avalanche's plugins, and the Avalanche objects they (and the template) hold,
    three levels deep, each once."""
    found: list[Any] = []
    seen: set[int] = set()

    def visit(owner: Any, depth: int) -> None:
        if id(owner) in seen or depth > 3:
            return
        seen.add(id(owner))
        found.append(owner)
        for value in list(vars(owner).values()):
            for item in value.values() if isinstance(value, dict) else [value]:
                if _is_avalanche_state(item):
                    visit(item, depth + 1)

    for plugin in getattr(strategy, "plugins", []):
        if _is_avalanche_state(plugin):
            visit(plugin, 0)
    for value in list(vars(strategy).values()):
        if _is_avalanche_state(value):
            visit(value, 1)
    return found


def _attributes(owner: Any) -> dict[str, Any]:
    """``vars(owner)`` with every dict, list and set copied, and those inside a dict too."""

    def copied(value: Any, depth: int) -> Any:
        if isinstance(value, dict):
            out = copy.copy(value)  # keeps a defaultdict's factory
            if depth:
                out.update({k: copied(v, depth - 1) for k, v in value.items()})
            return out
        return copy.copy(value) if isinstance(value, list | set) else value

    return {k: copied(v, 1) for k, v in vars(owner).items()}


def guard_experiences(strategy: Any, owner: Transactional) -> None:
    """Wrap ``strategy``'s experience phases so that ``owner`` rolls back on any error.

    Called from a plugin's ``before_training``; guards left from another strategy object (a
    copy restored from a checkpoint) are replaced."""
    current = strategy.__dict__.get(PHASES[0])
    if isinstance(current, _GuardedPhase) and current.transaction.strategy is strategy:
        if not any(o is owner for o in current.transaction.owners):
            current.transaction.owners.append(owner)
        return
    transaction = _Transaction(strategy, [owner])
    for phase in PHASES:
        inner = strategy.__dict__.get(phase)
        inner = inner.inner if isinstance(inner, _GuardedPhase) else inner
        strategy.__dict__[phase] = _GuardedPhase(transaction, phase, inner)


def release_experiences(strategy: Any) -> None:
    """Remove the guards (from ``after_training``). After an error ``after_training`` does not
    run and they stay until the next ``train()`` replaces them (a checkpoint taken meanwhile
    pickles them; they are replaced on resume)."""
    for phase in PHASES:
        current = strategy.__dict__.get(phase)
        if isinstance(current, _GuardedPhase):
            if current.inner is None:
                del strategy.__dict__[phase]
            else:
                strategy.__dict__[phase] = current.inner


@dataclass
class _Transaction:
    """The owners of one strategy's experiences, and Avalanche's state at the current one's start."""

    strategy: Any
    owners: list[Transactional]
    bookkeeping: Bookkeeping | None = None

    def roll_back(self, error: BaseException) -> None:
        """Every owner's rollback, then Avalanche's state; a failure is noted on ``error``."""
        bookkeeping, self.bookkeeping = self.bookkeeping, None
        steps: list[Callable[[], None]] = [functools.partial(o.rollback, self.strategy) for o in self.owners]
        steps += [bookkeeping.restore] if bookkeeping is not None else []
        for step in steps:
            try:
                step()
            except BaseException as failure:  # never hide the error that started it
                error.add_note(f"rolling back after it failed too: {failure!r}")

    def commit(self) -> None:
        self.bookkeeping = None
        for owner in self.owners:
            owner.commit()


class _GuardedPhase:
    """One phase of the strategy: the original call, inside its experience's transaction."""

    def __init__(self, transaction: _Transaction, phase: str, inner: Any) -> None:
        self.transaction, self.phase, self.inner = transaction, phase, inner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        strategy = self.transaction.strategy
        call = self.inner or getattr(type(strategy), self.phase).__get__(strategy)
        if self.phase == PHASES[0]:
            self.transaction.bookkeeping = Bookkeeping.take(strategy)
        try:
            result = call(*args, **kwargs)
        except BaseException as error:
            self.transaction.roll_back(error)
            raise
        if self.phase == PHASES[-1]:
            self.transaction.commit()
        return result

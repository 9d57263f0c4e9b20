"""The tracing engine of permutation discovery: features, op calls, union-find, the mode.

The model runs under a :class:`~torch.overrides.TorchFunctionMode` that sees every
torch call with its real tensors. Each activation carries at most one *permuted feature
axis* (:class:`Feature`) tied to a variable of a union-find (:class:`Variables`); each
tensor derived from a parameter by a view (``w.t()``, ``w.expand(...)``, ``w[None]``)
carries a :class:`ParamRef` mapping its axes to the parameter's. Rules (see
:func:`register_rule`) turn one op call into constraints: which variables are equal,
which are pinned to the identity (``FIXED``), which parameter axes follow which variable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

__all__ = [
    "FIXED",
    "Feature",
    "OpCall",
    "ParamRef",
    "ParameterAxes",
    "Stacked",
    "Tracer",
    "UnsupportedOperationError",
    "UnsupportedPolicy",
    "Variables",
    "register_rule",
]

UnsupportedPolicy = Literal["raise", "freeze"]
FIXED = 0
Part = tuple[int, int, int, int]  # (var, inner, outer, offset) of one axis segment


class UnsupportedOperationError(ValueError):
    """Raised when discovery meets an op it cannot permute through."""


@dataclass(frozen=True)
class Feature:
    """The permuted axis of an activation: ``shape[axis] == outer · size · inner``."""

    axis: int
    var: int
    size: int
    inner: int = 1
    outer: int = 1

    def moved(self, axis: int) -> Feature:
        return Feature(axis, self.var, self.size, self.inner, self.outer)

    @property
    def layout(self) -> tuple[int, int, int, int]:
        return (self.axis, self.size, self.inner, self.outer)


@dataclass(frozen=True)
class Stacked:
    """A tensor whose slices along ``axis`` carry different variables on their last axis
    (an RNN's final states, one slice per layer and direction)."""

    axis: int
    vars: tuple[int, ...]
    size: int


@dataclass(frozen=True)
class ParamRef:
    """A tensor that is a view of parameter/buffer ``name``: its axis ``k`` is the
    parameter's axis ``axes[k]`` (``None``: an axis the view added)."""

    name: str
    axes: tuple[int | tuple[int, ...] | None, ...]  # a tuple: parameter axes merged, row-major


@dataclass
class OpCall:
    """One intercepted torch call."""

    name: str
    func: Callable
    args: tuple
    kwargs: dict
    out: Any
    module: str

    def arg(self, position: int, name: str, default: Any = None) -> Any:
        if name in self.kwargs:
            return self.kwargs[name]
        return self.args[position] if len(self.args) > position else default

    def tensors(self) -> list[Tensor]:
        return [t for t in tree_leaves((self.args, self.kwargs)) if isinstance(t, Tensor)]

    def out_tensors(self) -> list[Tensor]:
        return [t for t in tree_leaves(self.out) if isinstance(t, Tensor)]


Rule = Callable[["Tracer", OpCall], Any]
RULES: dict[str, Rule] = {}
PARAM_AWARE: set[str] = set()  # rules that handle parameter operands themselves


def register_rule(*names: str, params: bool = False) -> Callable[[Rule], Rule]:
    """Register ``rule(tracer, call) -> Feature | None`` for torch functions by ``__name__``.

    Usable as a decorator; a user rule replaces the built-in one of the same name. A rule
    returns the feature of the op's outputs (or one per output tensor, as a list). Unless
    ``params=True`` (the rule assigns parameter axes itself), every parameter the op
    receives is pinned to the identity on all its axes, which always preserves the function.
    """

    def decorate(rule: Rule) -> Rule:
        for name in names:
            RULES[name] = rule
            (PARAM_AWARE.add if params else PARAM_AWARE.discard)(name)
        return rule

    return decorate


class Variables:
    """Union-find over feature variables, with sizes, block constraints and definitions.

    A *defined* variable stands for parts of other variables (each ``(var, inner, outer,
    offset)`` in its own index space): the concatenation of its inputs (``torch.cat`` along
    the permuted axis), or whole heads (an axis split into ``heads × head_dim``). It is
    never a group itself; its parts are.
    """

    def __init__(self) -> None:
        self.parent: list[int] = [FIXED]
        self.names: list[str] = ["<fixed>"]
        self.sizes: list[int] = [0]
        self.blocks: list[int] = [1]
        self.definitions: dict[int, tuple[Part, ...]] = {}

    def new(self, name: str, size: int) -> int:
        self.parent.append(len(self.parent))
        self.names.append(name)
        self.sizes.append(size)
        self.blocks.append(1)
        return len(self.parent) - 1

    def new_defined(self, name: str, size: int, parts: Sequence[Part]) -> int:
        """A variable of ``size`` units made of ``parts``."""
        var = self.new(name, size)
        self.definitions[var] = tuple(parts)
        return var

    def definition(self, var: int) -> tuple[Part, ...] | None:
        """The parts of ``var``'s class, if one of its variables is defined."""
        root = self.find(var)
        return next((d for v, d in self.definitions.items() if self.find(v) == root), None)

    def find(self, var: int) -> int:
        while self.parent[var] != var:
            self.parent[var] = self.parent[self.parent[var]]
            var = self.parent[var]
        return var

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        keep, drop = (ra, rb) if ra < rb else (rb, ra)  # FIXED (0) and older vars win
        self.parent[drop] = keep
        self.restrict(keep, self.blocks[drop])
        return keep

    def restrict(self, var: int, blocks: int) -> None:
        """Units of ``var`` may only move inside ``blocks`` equal blocks (finest common split)."""
        root = self.find(var)
        merged = math.lcm(self.blocks[root], blocks)
        size = self.sizes[root]
        if merged > 1 and (size == 0 or size % merged):
            self.union(root, FIXED)  # no equal split refines both: keep these units in place
            return
        self.blocks[root] = merged


class ParameterAxes:
    """Which variables permute each parameter axis: ``assignments[(name, axis)]`` holds
    one layout per use, a tuple of parts ``(var, inner, outer, offset)`` applied in order.
    Mixed into :class:`Tracer` (it provides ``vars``, ``shapes`` and ``claimed``)."""

    vars: Variables
    shapes: dict[str, torch.Size]
    assignments: dict[tuple[str, int], list[tuple[Part, ...]]]
    claimed: set[str]

    def assign_parts(self, ref: ParamRef | None, axis: int, parts: tuple[Part, ...]) -> None:
        """Record that axis ``axis`` of the view ``ref`` is permuted by ``parts`` in order:
        ``(var, inner, outer, offset)`` each."""
        if ref is None or not ref.axes:
            return
        target = ref.axes[axis % len(ref.axes)]
        if target is None:  # an axis the view added: broadcast, nothing to permute
            self.fix_vars(parts)
            return
        if isinstance(target, tuple):  # parameter axes merged into one: kept in place
            self.fix_vars(parts)
            self.pin_axes(ref.name, target)
            return
        key = (ref.name, target % len(self.shapes[ref.name]))
        self.assignments.setdefault(key, []).append(tuple(parts))
        self.claimed.add(ref.name)

    def assign(self, ref: ParamRef | None, axis: int, feature: Feature | int | None) -> None:
        """Record that ``ref``'s ``axis`` follows ``feature`` (``None``/FIXED: unpermuted)."""
        if isinstance(feature, Feature):
            part = (feature.var, feature.inner, feature.outer, 0)
        else:
            part = (FIXED if feature is None else feature, 1, 1, 0)
        self.assign_parts(ref, axis, (part,))

    def fix_vars(self, parts: Sequence[Part]) -> None:
        for part in parts:
            self.vars.union(part[0], FIXED)

    def fix_tensor(self, ref: ParamRef | None, *, keep: Sequence[int] = ()) -> None:
        """All axes of a parameter/buffer stay unpermuted, except those ``keep`` (axes of
        the view ``ref``) maps to."""
        if ref is None:
            return
        kept = {ref.axes[k % len(ref.axes)] for k in keep} if ref.axes else set()
        for axis in range(len(self.shapes[ref.name])):
            if axis not in kept:
                self.pin_axis(ref.name, axis)

    def pin_axes(self, name: str, axes: int | tuple[int, ...] | None) -> None:
        """The parameter axes one view axis stands for stay unpermuted."""
        for axis in axes if isinstance(axes, tuple) else () if axes is None else (axes,):
            self.pin_axis(name, axis)

    def pin_axis(self, name: str, axis: int) -> None:
        """Axis ``axis`` of parameter/buffer ``name`` stays unpermuted."""
        self.assignments.setdefault((name, axis), []).append(((FIXED, 1, 1, 0),))
        self.claimed.add(name)


class TensorStates:
    """What each tensor seen in the trace carries: a :class:`Feature`, a :class:`ParamRef`
    or a :class:`Stacked`. Mixed into :class:`Tracer` (it provides ``vars``, ``tensor_names``
    and ``_states``)."""

    vars: Variables
    tensor_names: dict[int, str]
    _states: dict[int, tuple[Tensor, Feature | ParamRef | Stacked | None]]

    def find(self, var: int) -> int:
        return self.vars.find(var)

    def union(self, a: int, b: int) -> int:
        return self.vars.union(a, b)

    def fix(self, feature: Feature | None) -> None:
        if feature is not None:
            self.union(feature.var, FIXED)

    def _entry(self, tensor: Any) -> Feature | ParamRef | Stacked | None:
        if not isinstance(tensor, Tensor):
            return None
        entry = self._states.get(id(tensor))
        if entry is not None and entry[0] is tensor:
            return entry[1]
        name = self.tensor_names.get(id(tensor))
        return ParamRef(name, tuple(range(tensor.dim()))) if name is not None else None

    def state(self, tensor: Any) -> Feature | None:
        """The permuted feature of an activation, or None."""
        entry = self._entry(tensor)
        if not isinstance(entry, Feature):
            return None
        return Feature(entry.axis, self.find(entry.var), entry.size, entry.inner, entry.outer)

    def stacked(self, tensor: Any) -> Stacked | None:
        entry = self._entry(tensor)
        return entry if isinstance(entry, Stacked) else None

    def pin(self, tensor: Any) -> None:
        """``tensor`` must keep its layout: pin whatever permutes it."""
        self.fix(self.state(tensor))
        stacked = self.stacked(tensor)
        for var in stacked.vars if stacked is not None else ():
            self.union(var, FIXED)

    def param(self, tensor: Any) -> ParamRef | None:
        """The parameter/buffer ``tensor`` is a view of, or None."""
        entry = self._entry(tensor)
        return entry if isinstance(entry, ParamRef) else None

    def set_state(self, tensor: Tensor, state: Feature | ParamRef | Stacked | None) -> None:
        self._states[id(tensor)] = (tensor, state)


class Tracer(TensorStates, ParameterAxes, TorchFunctionMode):
    """Feeds every torch call of one forward pass to its rule."""

    def __init__(self, names: dict[int, str], shapes: dict[str, torch.Size], policy: UnsupportedPolicy):
        super().__init__()
        if policy not in ("raise", "freeze"):
            raise ValueError(f"unsupported must be 'raise' or 'freeze', got {policy!r}.")
        self.policy = policy
        self.vars = Variables()
        self.tensor_names = names
        self.shapes = shapes
        self._states: dict[int, tuple[Tensor, Feature | ParamRef | Stacked | None]] = {}
        self.assignments: dict[tuple[str, int], list[tuple[Part, ...]]] = {}
        self.module_stack: list[str] = []
        self.module_types: dict[str, str] = {}
        self.claimed: set[str] = set()  # parameters the current rule assigned or pinned

    # -- variables --------------------------------------------------------------------
    def new_var(self, name: str, size: int) -> int:
        return self.vars.new(name, size)

    def is_composite(self, var: int) -> bool:
        return self.vars.definition(var) is not None

    @property
    def module_path(self) -> str:
        return self.module_stack[-1] if self.module_stack else ""

    def unsupported(self, call: OpCall, reason: str) -> None:
        """Raise, or (policy 'freeze') pin every permutation reaching ``call`` to identity."""
        if self.policy == "raise":
            raise UnsupportedOperationError(_refusal(call, reason, self.module_types))
        for tensor in call.tensors():
            self.fix(self.state(tensor))
            self.fix_tensor(self.param(tensor))

    # -- the mode ------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        call = OpCall(name, func, tuple(args), kwargs, out, self.module_path)
        outputs = call.out_tensors()
        if name in METADATA and not outputs:
            return out
        for tensor in call.tensors():
            if name not in PARAM_AWARE:
                self.fix_tensor(self.param(tensor))
            if name != "__getitem__" and self.stacked(tensor) is not None:
                self.pin(tensor)  # only indexing a single slice out is followed
        rule = RULES.get(name, no_rule)
        self.claimed = set()
        result = rule(self, call)
        states = result if isinstance(result, list) else [result] * len(outputs)
        self.claimed |= {s.name for s in states if isinstance(s, ParamRef)}
        for tensor in call.tensors():  # a parameter the rule did not handle (e.g. as an input) stays put
            ref = self.param(tensor)
            if ref is not None and ref.name not in self.claimed:
                self.fix_tensor(ref)
        for tensor, state in zip(outputs, states):
            self.set_state(tensor, state)
        return out


METADATA = {
    "size",
    "dim",
    "numel",
    "__get__",
    "is_contiguous",
    "is_floating_point",
    "__len__",
    "stride",
    "element_size",
    "get_device",
    "data_ptr",
    "is_complex",
    "nelement",
    "_set_grad_enabled",
    "__format__",
    "__repr__",
}


def _refusal(call: OpCall, reason: str, module_types: dict[str, str]) -> str:
    where = (
        f"module '{call.module}' ({module_types.get(call.module, '?')})"
        if call.module
        else "the model's own forward"
    )
    return (
        f"Permutation discovery cannot permute through `{call.name}` called in {where}: "
        f"{reason}. To proceed, pass unsupported='freeze' (the permutations reaching "
        f"this op stay identity), register a rule with "
        f"avalanche_rebasin.discovery.register_rule('{call.name}'), or write the spec "
        "by hand with PermutationSpec.from_groups(...)."
    )


def no_rule(tr: Tracer, call: OpCall) -> None:
    """Ops without a rule: fine on unpermuted data, otherwise unsupported."""
    if any(tr.state(t) is not None for t in call.tensors()):
        tr.unsupported(
            call,
            "there is no rule for this op (what works nearby: element-wise ops, reductions and "
            "reshapes over other axes than the units, linear/conv/norm layers, matmul/einsum; "
            "register_rule teaches discovery how this op moves the units)",
        )
    return None


def module_types(model: nn.Module) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in model.named_modules()}

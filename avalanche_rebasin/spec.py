"""PermutationSpec: which axes of which tensors share a permutation.

A spec maps every parameter or buffer that a permutation touches to one entry per
tensor axis: ``None`` (never permuted) or an :class:`AxisPermutation` naming the
group. An axis of length ``outer · size · inner`` is permuted in blocks: with the
group's index ``idx``, position ``(o, c, i)`` takes the value at ``(o, idx[c], i)``.
``inner > 1`` arises when a channel axis is flattened before a linear layer
(``inner = H·W``).

Specs are derived automatically with :meth:`PermutationSpec.from_model` (see
:mod:`avalanche_rebasin.discovery`) or written by hand.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .discovery import UnsupportedPolicy

__all__ = ["AxisPermutation", "GroupMember", "PermutationSpec"]


@dataclass(frozen=True)
class AxisPermutation:
    """One tensor axis permuted by ``group``, in blocks of ``inner`` repeated ``outer`` times."""

    group: str
    inner: int = 1
    outer: int = 1


@dataclass(frozen=True)
class GroupMember:
    """A tensor axis that a group permutes."""

    tensor: str
    axis: int
    inner: int = 1
    outer: int = 1


@dataclass(frozen=True)
class PermutationSpec:
    """Groups of hidden units that must be permuted together.

    Attributes:
        group_sizes: group name → number of units it permutes.
        axes: tensor name (as in ``state_dict``) → one entry per axis, ``None`` or
            an :class:`AxisPermutation`.
    """

    group_sizes: Mapping[str, int]
    axes: Mapping[str, tuple[AxisPermutation | None, ...]]
    members: Mapping[str, tuple[GroupMember, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        members: dict[str, list[GroupMember]] = {g: [] for g in self.group_sizes}
        for tensor, entries in self.axes.items():
            for axis, entry in enumerate(entries):
                if entry is None:
                    continue
                if entry.group not in members:
                    raise ValueError(
                        f"Tensor '{tensor}' axis {axis} refers to group '{entry.group}', which "
                        f"is not in group_sizes {sorted(self.group_sizes)}."
                    )
                if entry.inner < 1 or entry.outer < 1:
                    raise ValueError(f"Tensor '{tensor}' axis {axis}: inner/outer must be >= 1.")
                members[entry.group].append(GroupMember(tensor, axis, entry.inner, entry.outer))
        object.__setattr__(self, "group_sizes", dict(self.group_sizes))
        object.__setattr__(self, "axes", {k: tuple(v) for k, v in self.axes.items()})
        object.__setattr__(self, "members", {g: tuple(m) for g, m in members.items()})

    # -- construction -----------------------------------------------------------------
    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        example_input: Any,
        *,
        unsupported: UnsupportedPolicy = "raise",
    ) -> PermutationSpec:
        """Discover the spec by running ``model`` once on ``example_input``.

        See :func:`avalanche_rebasin.discovery.discover_spec`.
        """
        from .discovery import discover_spec

        return discover_spec(model, example_input, unsupported=unsupported)

    @classmethod
    def from_groups(
        cls,
        groups: Mapping[str, Iterable[tuple[str, int] | tuple[str, int, int]]],
        shapes: Mapping[str, torch.Size | tuple[int, ...]],
    ) -> PermutationSpec:
        """Write a spec by hand: ``{"hidden1": [("fc1.weight", 0), ("fc1.bias", 0),
        ("fc2.weight", 1)]}``; a third tuple item gives ``inner``. ``shapes`` (for
        instance ``{k: v.shape for k, v in model.state_dict().items()}``) sizes the groups.
        """
        axes: dict[str, list[AxisPermutation | None]] = {}
        sizes: dict[str, int] = {}
        for group, refs in groups.items():
            for ref in refs:
                tensor, axis, inner = (*ref, 1)[:3]
                if tensor not in shapes:
                    raise KeyError(f"Group '{group}' names tensor '{tensor}', which is not in shapes.")
                shape = tuple(shapes[tensor])
                entries = axes.setdefault(tensor, [None] * len(shape))
                if entries[axis] is not None:
                    raise ValueError(f"Tensor '{tensor}' axis {axis} is claimed by two groups.")
                entries[axis] = AxisPermutation(group, inner)
                size, rem = divmod(shape[axis], inner)
                if rem or sizes.setdefault(group, size) != size:
                    raise ValueError(
                        f"Group '{group}': tensor '{tensor}' axis {axis} has length {shape[axis]}, "
                        f"inconsistent with group size {sizes[group]} (inner={inner})."
                    )
        return cls(sizes, {k: tuple(v) for k, v in axes.items()})

    # -- editing --------------------------------------------------------------------------
    def without_groups(self, *names: str) -> PermutationSpec:
        """A copy in which the named groups are left unpermuted (identity)."""
        unknown = set(names) - set(self.group_sizes)
        if unknown:
            raise KeyError(f"Unknown groups {sorted(unknown)}; the spec has {list(self.group_sizes)}.")
        sizes = {g: n for g, n in self.group_sizes.items() if g not in names}
        axes = {}
        for tensor, entries in self.axes.items():
            kept = tuple(e if e is not None and e.group not in names else None for e in entries)
            if any(e is not None for e in kept):
                axes[tensor] = kept
        return PermutationSpec(sizes, axes)

    # -- queries -------------------------------------------------------------------------
    @property
    def groups(self) -> list[str]:
        return list(self.group_sizes)

    def __iter__(self) -> Iterator[str]:
        return iter(self.group_sizes)

    def __len__(self) -> int:
        return len(self.group_sizes)

    def validate(self, state: Mapping[str, Tensor]) -> None:
        """Raise ``ValueError`` if ``state`` (a state dict) does not fit this spec."""
        for tensor, entries in self.axes.items():
            if tensor not in state:
                raise ValueError(
                    f"The spec permutes tensor '{tensor}', which the model does not have; was the "
                    "spec derived from a different architecture?"
                )
            shape = state[tensor].shape
            if len(entries) != len(shape):
                raise ValueError(f"Tensor '{tensor}' has {len(shape)} axes, the spec expects {len(entries)}.")
            for axis, entry in enumerate(entries):
                if entry is None:
                    continue
                expected = entry.outer * self.group_sizes[entry.group] * entry.inner
                if shape[axis] != expected:
                    raise ValueError(
                        f"Tensor '{tensor}' axis {axis} has length {shape[axis]}, but group "
                        f"'{entry.group}' needs {expected}; the spec belongs to another architecture."
                    )

    def summary(self) -> str:
        """One line per group: its size and the tensor axes it permutes."""
        lines = []
        for group, size in self.group_sizes.items():
            refs = ", ".join(
                f"{m.tensor}[{m.axis}]" + (f"×{m.inner}" if m.inner > 1 else "") for m in self.members[group]
            )
            lines.append(f"{group} ({size}): {refs}")
        return "\n".join(lines)

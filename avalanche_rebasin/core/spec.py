"""PermutationSpec: which axes of which tensors share a permutation.

A spec maps every parameter or buffer that a permutation touches to one entry per
tensor axis: ``None`` (never permuted) or an :class:`AxisPermutation` naming the
group. An axis of length ``outer · size · inner`` is permuted in blocks: with the
group's index ``idx``, position ``(o, c, i)`` takes the value at ``(o, idx[c], i)``.
``inner > 1`` arises when a channel axis is flattened before a linear layer
(``inner = H·W``), ``outer > 1`` when one tensor stacks several blocks of the same
units (an LSTM's four gates).

An axis may carry several *parts*, given as a tuple of :class:`AxisPermutation`:
parts at different ``offset`` s permute disjoint segments of the axis (a concatenation
of groups, e.g. a DenseNet layer's input), and parts over the same segment are applied
one after the other, in order (attention heads: the dimensions within each head, then
whole heads). A group with ``blocks = B`` only has permutations that keep every unit
inside its block of ``size / B`` consecutive units (channels of one GroupNorm group,
dimensions of one attention head).

Specs are derived automatically with :func:`avalanche_rebasin.discover_spec` (see
:mod:`avalanche_rebasin.discovery`) or written by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = ["AxisEntry", "AxisPermutation", "GroupMember", "PermutationSpec", "axis_parts"]


@dataclass(frozen=True)
class AxisPermutation:
    """A segment of one tensor axis permuted by ``group``.

    The segment starts at ``offset`` and has length ``outer · size · inner``: units in
    blocks of ``inner``, the whole pattern repeated ``outer`` times.
    """

    group: str
    inner: int = 1
    outer: int = 1
    offset: int = 0


AxisEntry = AxisPermutation | tuple[AxisPermutation, ...] | None


def axis_parts(entry: AxisEntry) -> tuple[AxisPermutation, ...]:
    """The parts of one axis entry, in the order they are applied."""
    if entry is None:
        return ()
    return entry if isinstance(entry, tuple) else (entry,)


@dataclass(frozen=True)
class GroupMember:
    """A tensor axis that a group permutes."""

    tensor: str
    axis: int
    inner: int = 1
    outer: int = 1
    offset: int = 0
    position: int = 0  # index of this part among the axis's parts


@dataclass(frozen=True)
class PermutationSpec:
    """Groups of hidden units that must be permuted together.

    Attributes:
        group_sizes: group name → number of units it permutes.
        axes: tensor name (as in ``state_dict``) → one entry per axis: ``None``, an
            :class:`AxisPermutation`, or a tuple of them (see the module docstring).
        group_blocks: group name → number of blocks its units may not leave (default 1).

    :func:`avalanche_rebasin.discover_spec` derives a spec from a model by tracing.
    """

    # deprecated alias of discover_spec, attached by avalanche_rebasin.discovery for one release
    from_model: ClassVar[Callable[..., PermutationSpec]]

    group_sizes: Mapping[str, int]
    axes: Mapping[str, tuple[AxisEntry, ...]]
    group_blocks: Mapping[str, int] = field(default_factory=dict)
    members: Mapping[str, tuple[GroupMember, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        members = _members(self.group_sizes, self.axes)
        blocks = {g: int(b) for g, b in self.group_blocks.items() if int(b) != 1}
        for group, b in blocks.items():
            if group not in self.group_sizes or b < 1 or self.group_sizes[group] % b:
                raise ValueError(
                    f"group_blocks['{group}'] = {b} must divide the size of a group of the spec."
                )
        object.__setattr__(self, "group_sizes", dict(self.group_sizes))
        object.__setattr__(self, "axes", {k: tuple(v) for k, v in self.axes.items()})
        object.__setattr__(self, "group_blocks", blocks)
        object.__setattr__(self, "members", {g: tuple(m) for g, m in members.items()})

    def blocks(self, group: str) -> int:
        """Number of blocks the units of ``group`` stay inside (1: any permutation)."""
        return self.group_blocks.get(group, 1)

    # -- construction -----------------------------------------------------------------
    @classmethod
    def from_groups(
        cls,
        groups: Mapping[str, Iterable[tuple[str, int] | tuple[str, int, int]]],
        shapes: Mapping[str, torch.Size | tuple[int, ...]],
        *,
        blocks: Mapping[str, int] | None = None,
    ) -> PermutationSpec:
        """Write a spec by hand: ``{"hidden1": [("fc1.weight", 0), ("fc1.bias", 0),
        ("fc2.weight", 1)]}``; a third tuple item gives ``inner``. ``shapes`` (for
        instance ``{k: v.shape for k, v in model.state_dict().items()}``) sizes the groups;
        ``blocks`` gives groups whose units must stay inside equal consecutive blocks.
        """
        sizes, axes = _hand_written_axes(groups, shapes)
        return cls(sizes, axes, dict(blocks or {}))

    # -- editing --------------------------------------------------------------------------
    def without_groups(self, *names: str) -> PermutationSpec:
        """A copy in which the named groups are left unpermuted (identity)."""
        unknown = set(names) - set(self.group_sizes)
        if unknown:
            raise KeyError(f"Unknown groups {sorted(unknown)}; the spec has {list(self.group_sizes)}.")
        sizes = {g: n for g, n in self.group_sizes.items() if g not in names}
        axes = {}
        for tensor, entries in self.axes.items():
            kept = tuple(_keep_parts(entry, names) for entry in entries)
            if any(e is not None for e in kept):
                axes[tensor] = kept
        blocks = {g: b for g, b in self.group_blocks.items() if g not in names}
        return PermutationSpec(sizes, axes, blocks)

    # -- queries -------------------------------------------------------------------------
    @property
    def groups(self) -> list[str]:
        return list(self.group_sizes)

    def groups_touching(self, tensors: Iterable[str]) -> list[str]:
        """The groups that permute an axis of one of ``tensors`` (e.g. frozen parameters)."""
        names = set(tensors)
        return [g for g, members in self.members.items() if any(m.tensor in names for m in members)]

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
                _check_axis(tensor, axis, entry, shape[axis], self.group_sizes)

    def summary(self) -> str:
        """One line per group: its size and the tensor axes it permutes."""
        lines = []
        for group, size in self.group_sizes.items():
            refs = ", ".join(_describe(m) for m in self.members[group])
            blocks = f" in {self.blocks(group)} blocks" if self.blocks(group) > 1 else ""
            lines.append(f"{group} ({size}{blocks}): {refs}")
        return "\n".join(lines)


def _members(
    group_sizes: Mapping[str, int], axes: Mapping[str, tuple[AxisEntry, ...]]
) -> dict[str, list[GroupMember]]:
    """Every tensor axis segment of each group, validated."""
    members: dict[str, list[GroupMember]] = {g: [] for g in group_sizes}
    for tensor, entries in axes.items():
        for axis, entry in enumerate(entries):
            for position, part in enumerate(axis_parts(entry)):
                if part.group not in members:
                    raise ValueError(
                        f"Tensor '{tensor}' axis {axis} refers to group '{part.group}', which "
                        f"is not in group_sizes {sorted(group_sizes)}."
                    )
                if part.inner < 1 or part.outer < 1 or part.offset < 0:
                    raise ValueError(f"Tensor '{tensor}' axis {axis}: inner/outer must be >= 1, offset >= 0.")
                members[part.group].append(
                    GroupMember(tensor, axis, part.inner, part.outer, part.offset, position)
                )
    return members


def _check_axis(tensor: str, axis: int, entry: AxisEntry, length: int, sizes: Mapping[str, int]) -> None:
    """Every part of ``entry`` fits an axis of ``length`` (a single part spans all of it)."""
    for part in axis_parts(entry):
        expected = part.outer * sizes[part.group] * part.inner
        whole = not isinstance(entry, tuple)
        if (whole and expected != length) or part.offset + expected > length:
            raise ValueError(
                f"Tensor '{tensor}' axis {axis} has length {length}, but group '{part.group}' needs "
                f"{expected}"
                + (f" from offset {part.offset}" if part.offset else "")
                + "; the spec belongs to another architecture."
            )


def _describe(m: GroupMember) -> str:
    """``tensor[axis]@offset×inner×outer`` (only the parts that differ from the default)."""
    return (
        f"{m.tensor}[{m.axis}]"
        + (f"@{m.offset}" if m.offset else "")
        + (f"×{m.inner}" if m.inner > 1 else "")
        + (f"×{m.outer}outer" if m.outer > 1 else "")
    )


def _hand_written_axes(
    groups: Mapping[str, Iterable[tuple[Any, ...]]], shapes: Mapping[str, torch.Size | tuple[int, ...]]
) -> tuple[dict[str, int], dict[str, tuple[AxisEntry, ...]]]:
    """Group sizes and axis entries of :meth:`PermutationSpec.from_groups`."""
    axes: dict[str, list[AxisEntry]] = {}
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
    return sizes, {k: tuple(v) for k, v in axes.items()}


def _keep_parts(entry: AxisEntry, dropped: Iterable[str]) -> AxisEntry:
    kept = tuple(p for p in axis_parts(entry) if p.group not in dropped)
    if not kept:
        return None
    return kept[0] if len(kept) == 1 and not isinstance(entry, tuple) else kept

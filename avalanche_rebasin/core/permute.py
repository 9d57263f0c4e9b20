"""Apply hard or soft permutations to parameter/buffer dicts, functionally.

Convention: a group's hard permutation is an index tensor ``idx`` and acts on every
axis the group touches as ``t.index_select(axis, idx)``; its matrix is
``P[c, idx[c]] = 1``. A soft permutation is a doubly-stochastic ``P`` acting the same
way, ``t'[c] = Σ_j P[c, j] · t[j]``, so it is differentiable in ``P``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .spec import AxisEntry, AxisPermutation, PermutationSpec, axis_parts
from .state import load_state_, model_state, private_copy

__all__ = [
    "check_permutations",
    "identity_permutation",
    "invert_permutation",
    "permute",
    "permute_axis",
    "permute_state",
    "permute_tensor",
    "random_permutation",
    "soft_permute_state",
]


def identity_permutation(
    spec: PermutationSpec, device: torch.device | str | None = None
) -> dict[str, Tensor]:
    return {g: torch.arange(n, device=device) for g, n in spec.group_sizes.items()}


def random_permutation(
    spec: PermutationSpec, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> dict[str, Tensor]:
    """An independent uniformly random permutation per group (within its blocks, if any;
    deterministic under ``generator``)."""
    out = {}
    for group, n in spec.group_sizes.items():
        blocks, m = spec.blocks(group), n // spec.blocks(group)
        local = torch.stack([torch.randperm(m, generator=generator) for _ in range(blocks)])
        out[group] = (local + torch.arange(blocks)[:, None] * m).reshape(-1).to(device)
    return out


def invert_permutation(perms: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``inv`` such that permuting by ``perms`` then by ``inv`` is the identity."""
    return {g: torch.argsort(idx) for g, idx in perms.items()}


def check_permutations(spec: PermutationSpec, perms: Mapping[str, Tensor]) -> None:
    """Raise ``ValueError`` unless ``perms`` holds a valid permutation for every group."""
    missing = set(spec.group_sizes) - set(perms)
    if missing:
        raise ValueError(f"No permutation given for groups {sorted(missing)}.")
    for group, idx in perms.items():
        if group not in spec.group_sizes:
            raise ValueError(f"Permutation for unknown group '{group}'; the spec has {spec.groups}.")
        n = spec.group_sizes[group]
        if idx.dtype not in (torch.int64, torch.int32) or idx.shape != (n,):
            raise ValueError(
                f"Group '{group}' needs an integer index tensor of shape ({n},), got "
                f"{idx.dtype} {tuple(idx.shape)}."
            )
        if not torch.equal(torch.sort(idx).values.cpu(), torch.arange(n)):
            raise ValueError(f"The index for group '{group}' is not a permutation of 0..{n - 1}.")
        blocks = spec.blocks(group)
        if blocks > 1 and not torch.equal(idx.cpu() // (n // blocks), torch.arange(n) // (n // blocks)):
            raise ValueError(
                f"The index for group '{group}' moves units between its {blocks} blocks of "
                f"{n // blocks}; it must permute each block within itself."
            )


def _expanded_index(idx: Tensor, part: AxisPermutation, length: int) -> Tensor:
    """Index over a whole axis of ``length`` that moves the part's unit blocks by ``idx``."""
    n = idx.numel()
    inner = torch.arange(part.inner, device=idx.device)
    outer = torch.arange(part.outer, device=idx.device) * (n * part.inner)
    segment = (outer[:, None, None] + idx[None, :, None] * part.inner + inner[None, None, :]).reshape(-1)
    full = torch.arange(length, device=idx.device)
    full[part.offset : part.offset + segment.numel()] = segment + part.offset
    return full


def permute_axis(tensor: Tensor, axis: int, entry: AxisEntry, perms: Mapping[str, Tensor]) -> Tensor:
    """Hard-permute one axis by every part of its entry, in order."""
    for part in axis_parts(entry):
        idx = _expanded_index(perms[part.group].to(tensor.device), part, tensor.shape[axis])
        tensor = tensor.index_select(axis, idx)
    return tensor


def permute_tensor(
    tensor: Tensor,
    entries: tuple[AxisEntry, ...],
    perms: Mapping[str, Tensor],
    skip_axis: int | None = None,
) -> Tensor:
    """Hard-permute every axis of ``tensor`` that ``entries`` names (but ``skip_axis``)."""
    for axis, entry in enumerate(entries):
        if axis != skip_axis:
            tensor = permute_axis(tensor, axis, entry, perms)
    return tensor


def permute_state(
    state: Mapping[str, Tensor], spec: PermutationSpec, perms: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Hard permutation of a state dict; tensors the spec does not touch are passed through."""
    check_permutations(spec, perms)
    out = dict(state)
    for name, entries in spec.axes.items():
        if name in state:
            out[name] = permute_tensor(state[name], entries, perms)
    return out


def _soft_axis(tensor: Tensor, axis: int, plan: Tensor, part: AxisPermutation) -> Tensor:
    """``t'[(o, c, i)] = Σ_j P[c, j] · t[(o, j, i)]`` on the part's segment of ``axis``."""
    moved = tensor.movedim(axis, 0)
    length = part.outer * plan.shape[-1] * part.inner
    head, segment, tail = torch.split(moved, [part.offset, length, moved.shape[0] - part.offset - length])
    blocks = segment.reshape(part.outer, plan.shape[-1], part.inner, -1)
    mixed = torch.einsum("cg,ogir->ocir", plan.to(blocks.dtype), blocks).reshape(segment.shape)
    return torch.cat([head, mixed, tail]).movedim(0, axis)


def soft_permute_state(
    state: Mapping[str, Tensor], spec: PermutationSpec, plans: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """``π_P(θ)`` for doubly-stochastic ``plans`` (group → ``n × n``); differentiable in the plans.

    Integer tensors (e.g. ``num_batches_tracked``) are passed through.
    """
    out = dict(state)
    for name, entries in spec.axes.items():
        if name not in state or not state[name].is_floating_point():
            continue
        tensor = state[name]
        for axis, entry in enumerate(entries):
            for part in axis_parts(entry):
                if part.group in plans:
                    tensor = _soft_axis(tensor, axis, plans[part.group], part)
        out[name] = tensor
    return out


def permute(model: nn.Module, spec: PermutationSpec, perms: Mapping[str, Tensor]) -> nn.Module:
    """A NEW module whose parameters and buffers are permuted by ``perms``; ``model`` is untouched.

    The result computes the same function as ``model`` (hidden units only move).
    """
    state = model_state(model)
    spec.validate(state)
    permuted = permute_state(state, spec, perms)
    return load_state_(private_copy(model), {k: permuted[k] for k in spec.axes})

"""Weight matching of nested groups: whole heads and the dimensions within each head.

An attention layer's rows carry two permutations composed: ``W`` (block-diagonal, the
dimensions within each of ``H`` heads, applied first) and ``P_H`` (whole heads of
``d`` dimensions). With every other group fixed, the objective's terms on those rows are

    Σ_h Σ_i S_W[(h, i), (g, w_g(i))],   g = idx_H[h],

so the best pair is found exactly: for every pair of heads ``(h, g)`` the best
within-head matching is a ``d × d`` linear assignment on a block of ``S_W``; the head
assignment is then the linear assignment on those block scores (summed over the
nested groups, e.g. query/key and value dimensions). Coordinate descent on the two
groups separately gets stuck (a head can only move once its dimensions match).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..core.spec import PermutationSpec, axis_parts

__all__ = ["nested_groups", "solve_nested"]


def _parent(spec: PermutationSpec, group: str) -> str | None:
    """The head group applied right after every part of ``group``, if there is one."""
    blocks, size = spec.blocks(group), spec.group_sizes[group]
    parents = set()
    for m in spec.members[group]:
        parts = axis_parts(spec.axes[m.tensor][m.axis])
        nxt = parts[m.position + 1] if m.position + 1 < len(parts) else None
        if nxt is None or nxt.offset != m.offset or nxt.outer != 1 or (m.inner, m.outer) != (1, 1):
            return None
        if spec.group_sizes.get(nxt.group) != blocks or nxt.inner != size // blocks:
            return None
        parents.add(nxt.group)
    return parents.pop() if len(parents) == 1 else None


def nested_groups(spec: PermutationSpec) -> dict[str, list[str]]:
    """Head group → the within-head groups composed with it on every one of its members."""
    children: dict[str, list[str]] = {}
    for group in spec.groups:
        parent = _parent(spec, group) if spec.blocks(group) > 1 else None
        if parent is not None:
            children.setdefault(parent, []).append(group)
    out = {}
    for parent, kids in children.items():
        partnered = all(
            m.position > 0 and axis_parts(spec.axes[m.tensor][m.axis])[m.position - 1].group in kids
            for m in spec.members[parent]
        )
        if partnered:
            out[parent] = kids
    return out


def _block_scores(similarity: np.ndarray, heads: int) -> tuple[np.ndarray, np.ndarray]:
    """``scores[h, g]``: best within-head matching of A's head h to B's head g, and its columns."""
    d = similarity.shape[0] // heads
    scores = np.empty((heads, heads))
    columns = np.empty((heads, heads, d), dtype=np.int64)
    for h in range(heads):
        for g in range(heads):
            block = similarity[h * d : (h + 1) * d, g * d : (g + 1) * d]
            rows, cols = linear_sum_assignment(block, maximize=True)
            scores[h, g] = block[rows, cols].sum()
            columns[h, g, rows] = cols
    return scores, columns


def _combined(parent: Tensor, child: Tensor, d: int) -> Tensor:
    """Row ``(h, i)`` of the composed permutation reads B's row ``child[parent[h]·d + i]``."""
    return child.view(-1, d)[parent].reshape(-1)


def solve_nested(
    similarity: Mapping[str, Tensor], perms: Mapping[str, Tensor], parent: str, children: Sequence[str]
) -> tuple[dict[str, Tensor], float]:
    """Best ``(heads, within-head)`` permutations given each child's similarity computed with
    the head group at identity; returns them and the gain over ``perms``."""
    heads = perms[parent].numel()
    total, columns = np.zeros((heads, heads)), {}
    for child in children:
        scores, columns[child] = _block_scores(similarity[child].cpu().numpy(), heads)
        total += scores
    rows, assignment = linear_sum_assignment(total, maximize=True)
    device = perms[parent].device
    new = {parent: torch.as_tensor(assignment[np.argsort(rows)], device=device)}
    for child in children:
        d = similarity[child].shape[0] // heads
        within = np.empty(heads * d, dtype=np.int64)
        for h, g in zip(rows, assignment):
            within[g * d : (g + 1) * d] = g * d + columns[child][h, g]
        new[child] = torch.as_tensor(within, device=device)
    gain = 0.0
    for child in children:
        d = similarity[child].shape[0] // heads
        arange = torch.arange(heads * d, device=similarity[child].device)
        for sign, source in ((1.0, new), (-1.0, perms)):
            index = _combined(source[parent], source[child], d).to(arange.device)
            gain += sign * float(similarity[child][arange, index].sum())
    return new, gain

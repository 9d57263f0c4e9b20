"""Learnable Sinkhorn logits ``X_g`` for every permutation group of a spec."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .blocks import blocked_hard_permutation, blocked_sinkhorn
from .sinkhorn import Sinkhorn, WarmStart
from .spec import PermutationSpec

__all__ = ["PermutationLogits"]


class PermutationLogits(nn.Module):
    """Learnable logits ``X_g`` for every group, and their Sinkhorn plans.

    Groups of equal size are stacked and solved as one batch; with ``warm_start``, each
    batch's Sinkhorn call starts from the previous call's (see :class:`WarmStart`).
    """

    def __init__(self, spec: PermutationSpec, init: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.spec = spec
        self.names = list(spec.group_sizes)
        self.logits = nn.ParameterList([nn.Parameter(init[g].clone()) for g in self.names])
        buckets: dict[tuple[int, int], list[int]] = {}
        for i, g in enumerate(self.names):
            buckets.setdefault((spec.group_sizes[g], spec.blocks(g)), []).append(i)
        self._buckets = list(buckets.items())
        self.warm_starts = [WarmStart() for _ in self._buckets]

    def as_dict(self) -> dict[str, Tensor]:
        return {g: x.detach().clone() for g, x in zip(self.names, self.logits)}

    def as_views(self) -> dict[str, Tensor]:
        """The logits per group, detached, without a copy."""
        return {g: x.detach() for g, x in zip(self.names, self.logits)}

    def plans(self, solver: Sinkhorn, warm_start: bool = False) -> dict[str, Tensor]:
        """Each group's plan from ``solver`` (blocks solved separately, groups of one size
        batched), from the last call's potentials when ``warm_start``."""
        out: dict[str, Tensor] = {}
        for ((_, blocks), bucket), warm in zip(self._buckets, self.warm_starts):
            stacked = (
                self.logits[bucket[0]].unsqueeze(0)
                if len(bucket) == 1
                else torch.stack([self.logits[i] for i in bucket])
            )
            plans = blocked_sinkhorn(stacked, blocks, solver, warm if warm_start else None)
            out.update({self.names[i]: p for i, p in zip(bucket, plans.unbind(0))})
        return out

    def hard(self) -> dict[str, Tensor]:
        return {g: blocked_hard_permutation(x, self.spec.blocks(g)) for g, x in zip(self.names, self.logits)}

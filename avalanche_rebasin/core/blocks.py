"""Permutations that keep units inside equal consecutive blocks (``spec.blocks(group)``).

A group of ``n`` units in ``B`` blocks (the channels of each GroupNorm group, the
dimensions of each attention head) only admits block-diagonal permutations. Its
Sinkhorn plan is ``blockdiag(Sinkhorn(X_1/τ), …, Sinkhorn(X_B/τ))`` over the diagonal
blocks ``X_b`` of the ``n × n`` logits (the off-block logits are unused), and its hard
permutation solves one linear assignment per block.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sinkhorn import Sinkhorn, WarmStart, hard_permutation

__all__ = ["blocked_hard_permutation", "blocked_sinkhorn", "diagonal_blocks"]


def diagonal_blocks(matrix: Tensor, blocks: int) -> Tensor:
    """The ``B`` diagonal ``m × m`` blocks of ``(..., n, n)`` as ``(..., B, m, m)``."""
    n = matrix.shape[-1]
    m = n // blocks
    tiles = matrix.reshape(*matrix.shape[:-2], blocks, m, blocks, m)
    return tiles.diagonal(dim1=-4, dim2=-2).movedim(-1, -3)


def _block_diag(tiles: Tensor) -> Tensor:
    """Inverse of :func:`diagonal_blocks`: ``(..., B, m, m)`` → ``(..., n, n)``, zero off-block."""
    *batch, blocks, m, _ = tiles.shape
    eye = torch.eye(blocks, dtype=tiles.dtype, device=tiles.device)
    full = tiles.unsqueeze(-2) * eye[:, None, :, None]  # (..., B, m, B, m)
    return full.reshape(*batch, blocks * m, blocks * m)


def blocked_sinkhorn(
    logits: Tensor, blocks: int, solver: Sinkhorn, warm_start: WarmStart | None = None
) -> Tensor:
    """Sinkhorn plan restricted to block-diagonal couplings (``blocks = 1``: plain Sinkhorn)."""
    if blocks == 1:
        return solver(logits, warm_start)
    return _block_diag(solver(diagonal_blocks(logits, blocks), warm_start))


def blocked_hard_permutation(scores: Tensor, blocks: int = 1) -> Tensor:
    """Linear assignment maximising ``Σ_c S[c, idx[c]]`` among block-preserving permutations."""
    if blocks == 1:
        return hard_permutation(scores)
    m = scores.shape[-1] // blocks
    local = hard_permutation(diagonal_blocks(scores, blocks))  # (..., B, m)
    offsets = torch.arange(blocks, device=local.device)[:, None] * m
    return (local + offsets).reshape(*local.shape[:-2], blocks * m)

"""When to stop optimising permutation logits.

The result of an alignment is the hard permutation. When every row's largest logit sits
in a different column, that row-wise argmax *is* the linear assignment (each row gets
its own maximum, which no other assignment beats), so it can be read every step at
the cost of an argmax. The optimisation has converged once that permutation has stayed
the same for ``patience`` steps while the cost did not rise (by more than ``rtol``
times the first cost) over those steps.

A weight distance (``C_L2``, ``C_L1``) is never negative, so a hard permutation at which
it is zero — ``π(θ_B) = θ_A`` up to round-off, as for a permuted copy — is a global
optimum that no further step can improve: :class:`ZeroCost` detects it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.blocks import diagonal_blocks
from ..core.permute import permute_state
from ..core.spec import PermutationSpec
from ..core.validation import check_bool, check_integer, check_real

__all__ = ["Convergence", "Stopping", "ZeroCost", "greedy_permutations"]

ZERO_RTOL = 1e-12  # "zero": at most this times the cost against a zero network (round-off)


def greedy_permutations(logits: Mapping[str, Tensor], blocks: Mapping[str, int]) -> tuple[Tensor, Tensor]:
    """Row-wise argmax of every group's logits (within blocks), concatenated, and whether
    each one is a permutation (then it equals the hard permutation); both on the device."""
    indices, valid = [], []
    for group, x in logits.items():
        x = x.detach()
        b, n = blocks.get(group, 1), x.shape[-1]
        if b == 1:
            idx = x.argmax(-1)
        else:
            offsets = torch.arange(b, device=x.device)[:, None] * (n // b)
            idx = (diagonal_blocks(x, b).argmax(-1) + offsets).reshape(n)
        indices.append(idx)
        valid.append((idx.sort().values == torch.arange(n, device=x.device)).all())
    return torch.cat(indices), torch.stack(valid).all()


@dataclass(frozen=True)
class Stopping:
    """When an alignment stops, validated once.

    Attributes:
        max_steps: at most this many optimisation steps (0: return the initial permutation).
        patience, rtol: stop once the hard permutation has not changed for ``patience``
            steps and the cost did not rise over them by more than ``rtol`` times the first
            cost (``stop_reason == "converged"``); ``patience=None`` never stops early.
        at_zero_cost: with a weight cost (``"l2"``, ``"l1"``: never negative), stop as soon
            as the hard permutation gives zero cost up to round-off, ``π(θ_B) = θ_A``, a
            global optimum, checked before the first step and whenever the permutation
            changes (``stop_reason == "optimal"``).
    """

    max_steps: int = 100
    patience: int | None = 5
    rtol: float = 1e-3
    at_zero_cost: bool = True

    def __post_init__(self) -> None:
        check_integer("max_steps", self.max_steps, 0)
        check_integer("patience", self.patience, 1, optional=True)
        check_real("rtol", self.rtol, 0)
        check_bool("at_zero_cost", self.at_zero_cost)


class Convergence:
    """Tracks the hard permutation and the cost; ``update`` says when to stop."""

    def __init__(self, stopping: Stopping) -> None:
        self.patience, self.rtol = stopping.patience, stopping.rtol
        self.costs: list[float] = []
        self.previous: Tensor | None = None
        self.stable = 0

    def update(self, cost: float, greedy: Tensor, valid: Tensor) -> bool:
        """Record one step; True once converged."""
        self.costs.append(cost)
        if self.patience is None:
            return False
        same = self.previous is not None and bool(valid) and torch.equal(greedy, self.previous)
        self.stable = self.stable + 1 if same else 0
        self.previous = greedy
        if self.stable < self.patience:
            return False
        window_start = self.costs[-1 - self.patience]
        return cost <= window_start + self.rtol * abs(self.costs[0])


class ZeroCost:
    """Stop when the hard permutation's cost is zero: ``C(θ_A, π(θ_B)) ≤ ε·(C(θ_A, 0) + C(0, θ_B))``.

    For a cost that is never negative (a weight distance) such a permutation is a
    global optimum. Evaluated on the greedy permutation whenever it is valid and new.
    """

    def __init__(
        self,
        cost: Callable[..., Tensor],
        theta_a: Mapping[str, Tensor],
        theta_b: Mapping[str, Tensor],
        spec: PermutationSpec,
    ) -> None:
        self.cost, self.theta_a, self.theta_b, self.spec = cost, theta_a, theta_b, spec
        with torch.no_grad():
            zeros = {k: v.new_zeros(()).expand_as(v) for k, v in theta_b.items()}  # views: no copy
            self.tolerance = ZERO_RTOL * float(cost(theta_a, zeros, None) + cost(zeros, theta_b, None))
        self.checked: Tensor | None = None

    def reached(self, greedy: Tensor, valid: Tensor) -> bool:
        """True when ``greedy`` (concatenated group permutations) is a permutation of zero cost."""
        if not bool(valid) or (self.checked is not None and torch.equal(greedy, self.checked)):
            return False
        self.checked = greedy
        sizes = list(self.spec.group_sizes.values())
        perms = dict(zip(self.spec.group_sizes, greedy.split(sizes)))
        with torch.no_grad():
            value = float(self.cost(self.theta_a, permute_state(self.theta_b, self.spec, perms), None))
        return value <= self.tolerance

"""Baselines that find permutations without Sinkhorn: weight matching.

Weight matching (Ainsworth et al., 2022, Alg. 1) is coordinate descent on
``max_P Σ_k ⟨θ_A,k, π_P(θ_B)_k⟩``: for one group at a time, with every other group
fixed, the best permutation is the linear assignment on

    S_g = Σ_{(k, axis) ∈ g} A_k^{(axis)} · (B_k^{(axis)})ᵀ,

where ``X^{(axis)}`` lays tensor ``k`` out as ``units × rest`` along the group's axis
and ``B`` is already permuted on its other axes. Groups are visited in a random
order until a full sweep improves nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ._checks import check_compatible, resolve_spec
from .permute import identity_permutation, model_state, permute_tensor
from .sinkhorn import hard_permutation
from .spec import GroupMember, PermutationSpec

__all__ = ["similarity_matrix", "unit_matrix", "weight_matching", "weight_matching_state"]


def unit_matrix(tensor: Tensor, member: GroupMember, size: int) -> Tensor:
    """``tensor`` laid out as ``size × rest`` along the member's axis (blocks of ``inner``)."""
    moved = tensor.movedim(member.axis, 0).reshape(member.outer, size, member.inner, -1)
    return moved.transpose(0, 1).reshape(size, -1)


def similarity_matrix(
    theta_a: Mapping[str, Tensor],
    theta_b: Mapping[str, Tensor],
    spec: PermutationSpec,
    perms: Mapping[str, Tensor],
    group: str,
    keys: Sequence[str],
) -> Tensor:
    """``S_g[c, j] = Σ ⟨unit c of A, unit j of B⟩`` with B permuted on its other axes."""
    size = spec.group_sizes[group]
    ref = next(iter(theta_a.values()))
    total = torch.zeros(size, size, dtype=torch.float64, device=ref.device)
    for member in spec.members[group]:
        if member.tensor not in keys:
            continue
        a = theta_a[member.tensor]
        b = permute_tensor(theta_b[member.tensor], spec.axes[member.tensor], perms, skip_axis=member.axis)
        ua, ub = unit_matrix(a, member, size), unit_matrix(b, member, size)
        total += ua.double() @ ub.double().T
    return total


def weight_matching_state(
    theta_a: Mapping[str, Tensor],
    theta_b: Mapping[str, Tensor],
    spec: PermutationSpec,
    *,
    keys: Sequence[str] | None = None,
    max_iter: int = 100,
    generator: torch.Generator | None = None,
    init: Mapping[str, Tensor] | None = None,
) -> tuple[dict[str, Tensor], int]:
    """Coordinate-descent weight matching on state dicts; returns ``(perms, sweeps)``."""
    keys = list(keys) if keys is not None else [k for k in spec.axes if theta_a[k].is_floating_point()]
    device = next(iter(theta_a.values())).device
    perms = dict(init) if init is not None else identity_permutation(spec, device=device)
    groups = spec.groups
    sweeps = 0
    for sweeps in range(1, max_iter + 1):  # noqa: B007 - the count is returned
        improved = False
        for i in torch.randperm(len(groups), generator=generator).tolist():
            group = groups[i]
            sim = similarity_matrix(theta_a, theta_b, spec, perms, group, keys)
            new = hard_permutation(sim).to(device)
            arange = torch.arange(sim.shape[0], device=device)
            old_score = sim[arange, perms[group]].sum()
            new_score = sim[arange, new].sum()
            if new_score > old_score + 1e-12 * sim.abs().sum().clamp_min(1.0):
                perms[group] = new
                improved = True
        if not improved:
            break
    return perms, sweeps


def weight_matching(
    model_a: nn.Module,
    model_b: nn.Module,
    *,
    example_input=None,
    spec: PermutationSpec | None = None,
    max_iter: int = 100,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Permutations (group → index) that bring ``model_b`` into ``model_a``'s basin.

    ``permute(model_b, spec, weight_matching(model_a, model_b, ...))`` is the aligned model.
    """
    spec = resolve_spec(model_a, spec, example_input)
    check_compatible(model_a, model_b, spec)
    theta_a, theta_b = model_state(model_a), model_state(model_b)
    params = {name for name, _ in model_a.named_parameters()}
    keys = [k for k in spec.axes if k in params]
    generator = torch.Generator().manual_seed(seed)
    perms, _ = weight_matching_state(
        theta_a, theta_b, spec, keys=keys, max_iter=max_iter, generator=generator
    )
    return perms

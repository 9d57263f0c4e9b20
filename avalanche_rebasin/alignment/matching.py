"""Baselines that find permutations without Sinkhorn (Ainsworth et al., 2022).

* weight matching (their Alg. 1), below;
* activation matching: units paired by the correlation of their activations on data;
* the straight-through estimator (their Alg. 3): a free copy ``θ̃`` of ``θ_A`` is
  trained so that the midpoint ``(θ_A + π(θ_B)) / 2`` has low loss, where ``π`` is the
  weight matching of ``θ_B`` to ``θ̃``, hard in the forward pass, and the gradient
  reaches ``θ̃`` as if ``π(θ_B)`` were ``θ̃`` (straight through).

Weight matching (Ainsworth et al., 2022, Alg. 1) is coordinate descent on
``max_P Σ_k ⟨θ_A,k, π_P(θ_B)_k⟩``: for one group at a time, with every other group
fixed, the best permutation is the linear assignment on

    S_g = Σ_{(k, axis) ∈ g} A_k^{(axis)} · (B_k^{(axis)})ᵀ,

where ``X^{(axis)}`` lays tensor ``k`` out as ``units × rest`` along the group's axis
and ``B`` is already permuted on its other axes. The first sweep visits the groups in
the order discovery met them (input to output: each group then sees its inputs'
permutations already solved, which recovers a permuted copy of a feed-forward network
exactly), later sweeps a random order, until a full sweep improves nothing.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..core.blocks import blocked_hard_permutation
from ..core.model_inputs import call_model
from ..core.permute import identity_permutation, permute_axis, permute_state, permute_tensor
from ..core.spec import GroupMember, PermutationSpec, axis_parts
from ..core.state import functional_loss, interpolate_state, model_state, private_copy
from ..core.validation import check_integer
from .inputs import batch_stream, check_compatible, resolve_spec
from .nested import nested_groups, solve_nested

__all__ = ["similarity_matrix", "unit_matrix", "weight_matching", "weight_matching_state"]


def unit_matrix(tensor: Tensor, member: GroupMember, size: int) -> Tensor:
    """The member's segment of ``tensor`` laid out as ``size × rest`` (blocks of ``inner``)."""
    moved = tensor.movedim(member.axis, 0)
    moved = moved.narrow(0, member.offset, member.outer * size * member.inner)
    moved = moved.reshape(member.outer, size, member.inner, -1)
    return moved.transpose(0, 1).reshape(size, -1)


def _member_views(
    a: Tensor, b: Tensor, spec: PermutationSpec, perms: Mapping[str, Tensor], member: GroupMember
) -> tuple[Tensor, Tensor]:
    """``A`` and ``B`` such that ``⟨A, P_member B⟩`` is the member's term of the objective.

    ``B`` is permuted on its other axes and by the parts applied before the member's on
    its own axis; the parts applied after it are undone on ``A`` instead.
    """
    entries = spec.axes[member.tensor]
    parts = axis_parts(entries[member.axis])
    b = permute_tensor(b, entries, perms, skip_axis=member.axis)
    for part in parts[: member.position]:
        b = permute_axis(b, member.axis, part, perms)
    for part in reversed(parts[member.position + 1 :]):
        inverse = {part.group: torch.argsort(perms[part.group])}
        a = permute_axis(a, member.axis, part, inverse)
    return a, b


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
    total = None
    for member in spec.members[group]:
        if member.tensor not in keys:
            continue
        a, b = _member_views(theta_a[member.tensor], theta_b[member.tensor], spec, perms, member)
        ua, ub = unit_matrix(a, member, size), unit_matrix(b, member, size)
        term = ua.double() @ ub.double().T
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(size, size, dtype=torch.float64)
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
    device = next(iter(theta_a.values()), torch.empty(0)).device  # an empty state: nothing to permute
    perms = dict(init) if init is not None else identity_permutation(spec, device=device)
    groups, nested = spec.groups, nested_groups(spec)
    sweeps = 0
    for sweeps in range(1, max_iter + 1):
        improved = False
        first = sweeps == 1  # input to output: exact for a permuted copy of a feed-forward net
        order = range(len(groups)) if first else torch.randperm(len(groups), generator=generator).tolist()
        for i in order:
            group = groups[i]
            if group in nested:
                improved |= _update_nested(theta_a, theta_b, spec, perms, group, nested[group], keys)
                continue
            sim = similarity_matrix(theta_a, theta_b, spec, perms, group, keys)
            new = blocked_hard_permutation(sim, spec.blocks(group)).to(device)
            arange = torch.arange(sim.shape[0], device=device)
            old_score = sim[arange, perms[group]].sum()
            new_score = sim[arange, new].sum()
            if new_score > old_score + 1e-12 * sim.abs().sum().clamp_min(1.0):
                perms[group] = new
                improved = True
        if not improved:
            break
    return perms, sweeps


def _update_nested(
    theta_a: Mapping[str, Tensor],
    theta_b: Mapping[str, Tensor],
    spec: PermutationSpec,
    perms: dict[str, Tensor],
    parent: str,
    children: Sequence[str],
    keys: Sequence[str],
) -> bool:
    """Heads and the dimensions within them, solved jointly (see :mod:`._nested`)."""
    without_heads = {**perms, parent: torch.arange(spec.group_sizes[parent], device=perms[parent].device)}
    sims = {c: similarity_matrix(theta_a, theta_b, spec, without_heads, c, keys) for c in children}
    new, gain = solve_nested(sims, perms, parent, children)
    scale = sum(float(s.abs().sum()) for s in sims.values())
    if gain > 1e-12 * max(scale, 1.0):
        perms.update(new)
        return True
    return False


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
    With nothing to permute (no parameter in the spec, e.g. a model without parameters)
    the result is the identity permutation of every group (``{}`` when there is none).
    """
    check_integer("max_iter", max_iter, 1)
    check_integer("seed", seed, 0)
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


def _producers(model: nn.Module, spec: PermutationSpec) -> dict[str, list[str]]:
    """Per group, the modules whose own tensors carry the group on their output axis."""
    modules = dict(model.named_modules())
    out: dict[str, list[str]] = {}
    for group, members in spec.members.items():
        for m in members:
            path = m.tensor.rsplit(".", 1)[0] if "." in m.tensor else ""
            if (
                m.axis == 0
                and m.inner == 1
                and m.outer == 1
                and not isinstance(spec.axes[m.tensor][0], tuple)
                and path in modules
                and path not in out.get(group, [])
            ):
                out.setdefault(group, []).append(path)
    return out


class _CorrelationStats:
    """Running sums for the Pearson correlation of two unit sets."""

    def __init__(self) -> None:
        self.n = 0
        zero = torch.zeros((), dtype=torch.float64)  # broadcasts to the first batch's shapes
        self.sa, self.sb, self.saa, self.sbb, self.sab = zero, zero, zero, zero, zero

    def update(self, a: Tensor, b: Tensor) -> None:  # a, b: (samples, units)
        a, b = a.double(), b.double()
        self.sa, self.sb = self.sa + a.sum(0), self.sb + b.sum(0)
        self.saa, self.sbb = self.saa + (a * a).sum(0), self.sbb + (b * b).sum(0)
        self.sab = self.sab + a.T @ b
        self.n += a.shape[0]

    def correlation(self) -> Tensor:
        ma, mb = self.sa / self.n, self.sb / self.n
        cov = self.sab / self.n - ma[:, None] * mb[None, :]
        sd_a = (self.saa / self.n - ma**2).clamp_min(0).sqrt()
        sd_b = (self.sbb / self.n - mb**2).clamp_min(0).sqrt()
        return cov / (sd_a[:, None] * sd_b[None, :] + 1e-8)


def _units(output: Tensor, module: nn.Module) -> Tensor:
    """Activations as ``(samples·positions, units)``: units on the last axis for Linear/LayerNorm."""
    axis = -1 if isinstance(module, (nn.Linear, nn.LayerNorm)) or output.dim() == 2 else 1
    return output.movedim(axis, -1).reshape(-1, output.shape[axis])


@torch.no_grad()
def activation_matching(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable,
    *,
    example_input=None,
    spec: PermutationSpec | None = None,
    max_batches: int | None = None,
) -> dict[str, Tensor]:
    """Pair units by activation correlation on ``data`` (batches ``x`` or ``(x, y)``).

    For each group, ``S_g = Σ_m corr(act_A^m, act_B^m)`` over the modules ``m`` whose
    outputs carry the group (a residual stream sums its layers); the permutation is the
    linear assignment on ``S_g``. Runs on copies in eval mode; neither model changes. A
    group whose units no module output shows (a layer whose weights its parent uses
    directly, as attention's ``out_proj``; units split by a ``chunk``) stays the identity,
    with a warning naming it: use weight matching or Sinkhorn for those.
    """
    check_integer("max_batches", max_batches, 1, optional=True)
    spec = resolve_spec(model_a, spec, example_input)
    check_compatible(model_a, model_b, spec)
    copies = [private_copy(model_a).eval(), private_copy(model_b).eval()]
    producers = _producers(copies[0], spec)
    sizes = {p: spec.group_sizes[g] for g, paths in producers.items() for p in paths}
    stats = _correlate(copies, sizes, itertools.islice(data, max_batches))
    first = next(itertools.chain(model_a.parameters(), model_a.buffers()), None)
    perms = identity_permutation(spec, device=first.device if first is not None else None)
    unseen = []
    for group in spec.group_sizes:
        seen = [stats[p] for p in producers.get(group, []) if stats[p].n]
        if not seen:
            unseen.append(group)
            continue
        total = functools.reduce(torch.add, [s.correlation() for s in seen])
        perms[group] = blocked_hard_permutation(total, spec.blocks(group))
    if unseen:
        warnings.warn(
            f"activation_matching: no module output carries the units of {len(unseen)} group(s), which "
            f"stay the identity: {unseen[:5]}; weight_matching or align() permutes them.",
            stacklevel=3,  # the caller, past torch.no_grad's wrapper
        )
    return perms


def _correlate(
    copies: Sequence[nn.Module], sizes: Mapping[str, int], data: Iterable
) -> dict[str, _CorrelationStats]:
    """Correlation statistics of the two models' outputs at every module path in ``sizes``
    whose output is a tensor with that many units (a path never called, or whose output
    does not carry the units — the model's own logits — gathers none)."""
    captured: list[dict[str, Tensor]] = [{}, {}]
    handles = []
    for side, model in enumerate(copies):
        modules = dict(model.named_modules())
        for path, size in sizes.items():

            def hook(module, _inputs, output, side=side, path=path, size=size):
                units = _units(output, module) if isinstance(output, Tensor) and output.dim() >= 2 else None
                if units is not None and units.shape[-1] == size:
                    captured[side][path] = units

            handles.append(modules[path].register_forward_hook(hook))
    stats = {path: _CorrelationStats() for path in sizes}
    try:
        for batch in data:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            for side, model in enumerate(copies):
                captured[side].clear()
                call_model(model, x)
            for path, stat in stats.items():
                if path in captured[0] and path in captured[1]:
                    stat.update(captured[0][path], captured[1][path])
    finally:
        for handle in handles:
            handle.remove()
    return stats


def straight_through(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable,
    *,
    example_input=None,
    spec: PermutationSpec | None = None,
    steps: int = 200,
    lr: float = 1e-3,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Ainsworth et al.'s straight-through estimator; returns permutations for ``model_b``.

    ``data`` yields ``(x, y)`` batches and is cycled through for ``steps`` Adam steps (a
    one-shot iterator is read once: the steps end when it does); empty data raises ``ValueError``.
    """
    spec = resolve_spec(model_a, spec, example_input)
    check_compatible(model_a, model_b, spec)
    theta_a, theta_b = model_state(model_a), model_state(model_b)
    params = {name for name, _ in model_a.named_parameters()}
    keys = [k for k in spec.axes if k in params and theta_a[k].is_floating_point()]
    free = {k: theta_a[k].clone().requires_grad_() for k in params}
    optimizer = torch.optim.Adam(free.values(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    perms = identity_permutation(spec, device=theta_a[keys[0]].device if keys else None)
    batches = batch_stream(data, "data")
    for _ in tqdm(range(steps), desc="straight-through", disable=not progress, leave=False):
        batch = next(batches, None)
        if batch is None:
            break
        with torch.no_grad():
            perms, _ = weight_matching_state(
                {**theta_a, **free}, theta_b, spec, keys=keys, generator=generator, init=perms
            )
        projected = permute_state(theta_b, spec, perms)
        straight = {k: free[k] + (projected[k] - free[k]).detach() for k in free}
        midpoint = interpolate_state(theta_a, {**projected, **straight}, 0.5)
        loss = functional_loss(model_a, midpoint, batch, loss_fn)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        perms, _ = weight_matching_state(
            {**theta_a, **free}, theta_b, spec, keys=keys, generator=generator, init=perms
        )
    return perms

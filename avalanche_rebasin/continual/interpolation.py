"""Align, then interpolate (Kozal et al., "Continual Learning with Weight Interpolation", 2024).

After training freely on a new experience, the trained weights θ_new are brought into the
basin of the previous experience's weights θ_old by a permutation π of their units, and

    θ = (1 − α)·θ_old + α·π(θ_new)

is committed (α = 1: the trained network, as a function; α = 0: the previous weights). The
alignments are this library's: none (the identity), weight matching, activation matching,
or Sinkhorn with ``C_L2``, with the task loss at the commit point ``(1 − α)θ_old + απ(θ_new)``
(``sinkhorn_mid``; the midpoint cost when α = ½) or at random points (``sinkhorn_rnd``).
This module is torch only; the Avalanche plugin is :mod:`avalanche_rebasin.interpolation_plugin`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

from ..alignment import Stopping, align
from ..alignment.matching import activation_matching, weight_matching
from ..core.permute import identity_permutation, permute_state
from ..core.spec import PermutationSpec
from ..core.state import functional_loss, interpolate_state, private_copy
from .alpha_search import AlphaSearch

__all__ = [
    "ALIGNMENTS",
    "InterpolationReport",
    "alignment_permutations",
    "interpolate_aligned",
    "tensor_alphas",
]

Alignment = Literal[
    "none", "weight_matching", "activation_matching", "sinkhorn_l2", "sinkhorn_mid", "sinkhorn_rnd"
]
ALIGNMENTS: tuple[str, ...] = Alignment.__args__  # type: ignore[attr-defined]
NEEDS_DATA = ("activation_matching", "sinkhorn_mid", "sinkhorn_rnd")


@dataclass
class InterpolationReport:
    """What one commit did: the alignment, how many units it moved and what it cost, and
    with ``alpha="auto"`` the search that chose ``alpha`` (every candidate's held-out accuracy)."""

    experience: int
    alignment: str
    alpha: float
    units_moved: int
    units_total: int
    align_seconds: float
    align_samples: int
    alpha_search: AlphaSearch | None = None


def alignment_permutations(
    old: nn.Module,
    new: nn.Module,
    spec: PermutationSpec,
    alignment: str,
    *,
    data: Sequence[Any] = (),
    alpha: float | Mapping[str, float] = 0.5,
    steps: int = 100,
    seed: int = 0,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy,
) -> dict[str, Tensor]:
    """Permutations (group → index) that bring ``new`` into ``old``'s basin.

    ``data`` holds ``(x, y)`` batches for the data-driven alignments; Sinkhorn starts from
    the weight-matching solution and runs at most ``steps`` steps."""
    if alignment not in ALIGNMENTS:
        raise ValueError(f"unknown alignment {alignment!r}; choose one of {list(ALIGNMENTS)}")
    if alignment in NEEDS_DATA and not data:
        raise ValueError(f"alignment {alignment!r} needs data (x, y) batches; none were given")
    device = next((p.device for p in new.parameters()), None)
    if alignment == "none":
        return identity_permutation(spec, device=device)
    if alignment == "weight_matching":
        return weight_matching(old, new, spec=spec, seed=seed)
    if alignment == "activation_matching":
        return activation_matching(old, new, data, spec=spec)
    cost: Any = {"sinkhorn_l2": "l2", "sinkhorn_rnd": "rnd"}.get(alignment)
    if alignment == "sinkhorn_mid":
        reference = private_copy(old)  # its forward may mutate it (BatchNorm statistics)

        def cost(a: Mapping[str, Tensor], b: Mapping[str, Tensor], batch: Any) -> Tensor:
            return functional_loss(reference, interpolate_state(a, b, alpha), batch, loss_fn)

    result = align(
        old, new, spec=spec, cost=cost, data=list(data) or None, loss_fn=loss_fn, seed=seed,
        progress=False, stopping=Stopping(max_steps=steps),
    )  # fmt: skip
    return result.permutations


def interpolate_aligned(
    old: Mapping[str, Tensor],
    new: Mapping[str, Tensor],
    spec: PermutationSpec,
    perms: Mapping[str, Tensor],
    alpha: float | Mapping[str, float],
    keep: Collection[str] = (),
) -> dict[str, Tensor]:
    """The commit ``(1 − α)·old + α·π(new)`` (:func:`~avalanche_rebasin.core.state.interpolate_state`
    of ``old`` and the permuted ``new``; the tensors in ``keep``, frozen parameters, from ``old``)."""
    return interpolate_state(old, permute_state(new, spec, perms), alpha, keep=keep)


def tensor_alphas(
    names: Iterable[str],
    alpha: float,
    layer_alpha: Mapping[str, float] | None,
    aliases: Mapping[str, Sequence[str]] | None = None,
) -> float | dict[str, float]:
    """``alpha``, or with ``layer_alpha`` (module path → α) one α per tensor name: that of the
    longest path the tensor lies under, else ``alpha``. ``aliases`` maps a name to every name
    the same tensor has (tied weights, a module registered twice): a path matches through any
    of them. Raises ``ValueError`` naming a path no tensor lies under, or a tied tensor whose
    names would get different α."""
    if not layer_alpha:
        return alpha
    names = list(names)
    known = {n: list(aliases.get(n, [n])) if aliases else [n] for n in names}

    def under(name: str, path: str) -> bool:
        return path == "" or name == path or name.startswith(path + ".")

    def own_alpha(name: str) -> float:
        paths = [p for p in layer_alpha if under(name, p)]
        return float(layer_alpha[max(paths, key=len)]) if paths else alpha

    every = [n for ns in known.values() for n in ns]
    missing = [p for p in layer_alpha if not any(under(n, p) for n in every)]
    if missing:
        modules = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in every if "." in n))
        shown = ", ".join(modules[:12]) + (f", … ({len(modules)} in all)" if len(modules) > 12 else "")
        raise ValueError(f"layer_alpha: no parameter or buffer lies under {missing}; module paths: {shown}")
    out = {}
    for name, all_names in known.items():
        alphas = {n: own_alpha(n) for n in all_names}
        if len(set(alphas.values())) > 1:
            raise ValueError(
                f"layer_alpha: {' and '.join(all_names)} are one tensor (tied), which would get α "
                f"{' and '.join(str(a) for a in alphas.values())}; give those modules the same α."
            )
        out[name] = next(iter(alphas.values()))
    return out


def tensor_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Every name of each parameter and buffer, keyed by the name :func:`model_state` uses."""
    by_tensor: dict[int, list[str]] = {}
    named = (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        by_tensor.setdefault(id(tensor), []).append(name)
    return {names[0]: names for names in by_tensor.values()}


def timed_alignment(*args: Any, **kwargs: Any) -> tuple[dict[str, Tensor], float]:
    """:func:`alignment_permutations` and its wall time in seconds."""
    start = time.perf_counter()
    perms = alignment_permutations(*args, **kwargs)
    return perms, time.perf_counter() - start

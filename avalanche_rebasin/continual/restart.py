"""Where the next experience's training starts: the previous weights, a fresh
initialisation, or a mix of the two.

    θ_start = (1 − r)·θ_old + r·θ_init

with ``θ_init`` the model's own initialisation (every submodule's ``reset_parameters``, or
``_reset_parameters`` for torch's attention and transformer modules)
drawn from a seeded generator. ``r = 0`` fine-tunes θ_old (the usual continual-learning
start); ``r = 1`` trains from scratch; in between it is Ash & Adams' "shrink and perturb"
(NeurIPS 2020) with the perturbation drawn from the initialisation. Starting away from
θ_old gives the new network room to learn, and gives an alignment before interpolation
something to do: a network fine-tuned from θ_old stays in θ_old's basin.
Torch only.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from ..core.state import interpolate_state, model_state, private_copy

__all__ = ["fresh_initialisation", "restart_seed", "restart_state"]

_RESTART_STREAM = 0x5E5EED  # keeps these seeds apart from any other use of (seed, experience)


def restart_seed(seed: int, experience: int) -> int:
    """The generator seed of the fresh initialisation drawn before ``experience``: a
    ``SeedSequence`` hash of ``(seed, experience)``, 64 bits wide, so it does not coincide
    with the small integers models are built under (``torch.manual_seed(1)`` then building
    the model would otherwise make some restart re-draw the model's own initialisation)."""
    high, low = np.random.SeedSequence([seed, experience, _RESTART_STREAM]).generate_state(2)
    return int(high) << 32 | int(low)


def fresh_initialisation(model: nn.Module, seed: int) -> dict[str, Tensor]:
    """A new draw of ``model``'s initialisation (``model`` untouched), deterministic in ``seed``.

    The draw is made on a CPU copy with the CPU generator (seeded, then restored), so it is
    the same on every device and leaves every device's generator alone; each tensor is then
    moved to its place in ``model``. Raises ``ValueError`` when no submodule has
    ``reset_parameters`` (nothing to draw).
    """
    copy = private_copy(model).to("cpu")
    resettable = [reset for m in _children_first(copy) if (reset := _initialiser(m)) is not None]
    if not resettable:
        raise ValueError(
            f"{type(model).__name__} has no submodule with reset_parameters(), so there is no "
            "initialisation to restart from; use restart=0 (fine-tune the previous weights)."
        )
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.default_generator.manual_seed(seed)
        for reset in resettable:
            reset()
    places = {k: v.device for k, v in model_state(model).items()}
    return {k: v.detach().to(places[k], copy=True) for k, v in model_state(copy).items()}


def _children_first(module: nn.Module) -> Iterator[nn.Module]:
    """Submodules after their children, the order in which construction initialises them (a
    parent's initialiser, like ``nn.Transformer``'s, overrides its children's)."""
    for child in module.children():
        yield from _children_first(child)
    yield module


def _initialiser(module: nn.Module) -> Callable[[], None] | None:
    """``reset_parameters``, or torch's private ``_reset_parameters`` (``nn.MultiheadAttention``,
    ``nn.Transformer``); None when it has neither."""
    for name in ("reset_parameters", "_reset_parameters"):
        if callable(getattr(module, name, None)):
            return getattr(module, name)
    return None


def restart_state(
    previous: Mapping[str, Tensor], fresh: Mapping[str, Tensor], r: float, frozen: Collection[str] = ()
) -> dict[str, Tensor]:
    """``(1 − r)·previous + r·fresh`` (:func:`~avalanche_rebasin.core.state.interpolate_state`);
    frozen parameters keep their previous values exactly. Integer buffers (BatchNorm's batch
    counter) cannot be mixed and come from the nearer end: ``previous`` for ``r ≤ ½``,
    ``fresh`` above (from scratch, a ``momentum=None`` BatchNorm then averages its
    statistics afresh)."""
    return interpolate_state(previous, fresh, r, keep=frozen)

"""Settings of the Re-basin incremental-learning method (Guerrero Peña et al., CVPR 2023, §4.3).

At every experience ``i > 0`` the weights ``θ_i`` are held fixed, and a residual ``δ``
and Sinkhorn logits ``X`` are trained on

    C_CL(δ, P; θ_i) = C((1 − a) θ_i + a π_P(θ_i) + δ) + β‖δ‖²,   P = Sinkhorn(X / τ),

(``a = train_alpha``; the paper trains the midpoint, ``a = ½``), then

    θ_{i+1} = (1 − α) θ_i + α π_P̂(θ_i) + δ

is committed with the hard permutation ``P̂``. :class:`RebasinConfig` holds every knob,
validated once with strict types (``True`` is not an α, ``"False"`` is not a boolean);
:data:`PRESETS` names the settings the README recommends.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from ..core.sinkhorn import Sinkhorn
from .alpha_search import ALPHA_GRID
from .interpolation import ALIGNMENTS

__all__ = ["ALIGN_DATA", "PRESETS", "InterpolationConfig", "RebasinConfig"]

#: Named settings (keyword arguments of :class:`RebasinConfig`).
#: ``paper``: the authors' Rotated-MNIST code (``rebasinIL.py``), 5 epochs per re-basin
#: experience, and their forward: 20 Sinkhorn iterations from ``β = 0`` at every step (no
#: warm start); like the defaults, the logits on AdamW (weight decay 0.01) and δ's weight
#: decay applied after its gradient is clipped.
#: ``midpoint``: the paper's training (soft plan, midpoint) with δ on Adam (lr 1e-3, no
#: clip), a budget that does not starve on small data sets; logits without weight decay.
#: ``consistent``: the same δ budget, and trains what is committed: weight α = 0.2 on
#: ``π(θ)`` in training too, the hard permutation in the forward (straight-through).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"rebasin_epochs": 5, "sinkhorn": Sinkhorn(), "warm_start": False},
    "midpoint": {"delta_optimizer": "adam", "delta_lr": 1e-3, "delta_clip": None, "perm_weight_decay": 0.0},
    "consistent": {
        "train_alpha": 0.2,
        "straight_through": True,
        "delta_optimizer": "adam",
        "delta_lr": 1e-3,
        "delta_clip": None,
        "perm_weight_decay": 0.0,
    },
}


#: the default Sinkhorn forward stops once the marginals are this close (float32 reaches it)
SINKHORN_THRESHOLD = 1e-4


@dataclass(frozen=True)
class RebasinConfig:
    """Every setting of the method; the defaults are the authors' code (``rebasinIL.py``),
    but for the warm-started Sinkhorn forward (the ``paper`` preset restores theirs).

    Args:
        alpha: share of the permuted weights in the commit, in [0, 1].
        train_alpha: share ``a`` of ``π_P(θ)`` in the network trained at each step,
            ``(1 − a)θ + aπ_P(θ) + δ``, in [0, 1] (paper: 0.5; None: same as ``alpha``).
        beta: weight of ``‖δ‖²`` (the published weight decay 0.1 on δ is β = 0.05).
        sinkhorn: the Sinkhorn operator of the plans (default: τ = 1, at most 20 iterations,
            stopping at a marginal error of 1e-4).
        tau_final: anneal ``sinkhorn.tau`` geometrically to this value over each
            experience's steps.
        straight_through: forward with the hard ``P̂``, backward through the soft plan.
        association: where the soft plans of plain linear layers are applied: ``"auto"``
            (per layer and batch, the order with fewer MACs), ``"weight"`` (form
            ``P W Pᵀ``) or ``"activation"`` (apply ``P`` to activations); the same function
            either way (see :mod:`~avalanche_rebasin.continual.association`).
        warm_start: start each step's Sinkhorn forward from the last step's potentials and
            its backward's conjugate gradients from the last solution (with
            ``sinkhorn.threshold``, the forward stops once the plan is balanced).
        perm_lr: AdamW's learning rate of the logits.
        perm_weight_decay: AdamW's decoupled weight decay of the logits,
            ``X ← (1 − perm_lr·perm_weight_decay) X`` per step (the authors train them with the
            model's AdamW, whose default is 0.01).
        perm_init_noise: standard deviation of their initial noise.
        perm_init: ``"identity"`` (``X = I + noise``) or ``"similarity"`` (``X`` = cosine
            similarity of θ's units + noise).
        delta_optimizer: δ's optimiser, ``"sgd"`` or ``"adam"``.
        delta_lr: its learning rate (0 freezes δ).
        delta_clip: the clip of δ's gradient (None: none).
        penalty_after_clip: add the penalty's gradient ``2βδ`` after δ's gradient is clipped,
            as the authors' SGD weight decay does (True); False clips the sum.
        delta_init_std: the standard deviation of δ's initial values.
        rebasin_epochs: epochs of a re-basin experience (None: the strategy's ``train_epochs``).
        rebasin_steps: at least this many optimiser steps per re-basin experience,
            whatever the data size (overrides ``rebasin_epochs``).
        permute: False fixes ``P`` to the identity (the δ-only ablation).
        bn_reestimate: re-estimate BatchNorm statistics of ``θ_{i+1}`` on the experience's
            training batches; False commits ``(1 − α)·stats_i + α·π(stats_i)``.
        seed: seeds δ's and the logits' initial values at every experience.
        diagnostic_samples: samples of the experience used to measure the accuracy of the
            trained, rounded and committed networks (0: off, the default; three extra
            passes over that many samples).
    """

    alpha: float = 0.2
    train_alpha: float | None = 0.5
    beta: float = 0.05
    sinkhorn: Sinkhorn = field(default_factory=lambda: Sinkhorn(threshold=SINKHORN_THRESHOLD))
    tau_final: float | None = None
    straight_through: bool = False
    association: Literal["auto", "weight", "activation"] = "auto"
    warm_start: bool = True
    perm_lr: float = 0.1
    perm_weight_decay: float = 0.01
    perm_init_noise: float = 0.1
    perm_init: Literal["identity", "similarity"] = "identity"
    delta_optimizer: Literal["sgd", "adam"] = "sgd"
    delta_lr: float = 0.05
    delta_clip: float | None = 1e-3
    penalty_after_clip: bool = True
    delta_init_std: float = 1e-4
    rebasin_epochs: int | None = None
    rebasin_steps: int | None = None
    permute: bool = True
    bn_reestimate: bool = True
    seed: int = 0
    diagnostic_samples: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.sinkhorn, Sinkhorn):
            raise TypeError(f"Re-basin: sinkhorn must be a Sinkhorn, got {type(self.sinkhorn).__name__}.")
        _validate(self)
        if self.train_alpha is None:
            object.__setattr__(self, "train_alpha", self.alpha)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _REALS and value is not None:
                object.__setattr__(self, f.name, float(value))
            elif f.name in _INTEGERS and value is not None:
                object.__setattr__(self, f.name, int(value))

    @classmethod
    def from_settings(cls, **settings: Any) -> RebasinConfig:
        """A config from keyword settings, as strategies take them: its fields, and the
        Sinkhorn operator's ``tau`` and ``n_iter``, which fill ``sinkhorn``."""
        if "sinkhorn_iters" in settings:
            warnings.warn(
                "Re-basin: sinkhorn_iters is deprecated; it is the Sinkhorn operator's n_iter.",
                DeprecationWarning,
                stacklevel=3,
            )
            settings["n_iter"] = settings.pop("sinkhorn_iters")
        operator = {k: settings.pop(k) for k in SINKHORN_SETTINGS if k in settings}
        if operator:
            base = settings.pop("sinkhorn", Sinkhorn(threshold=SINKHORN_THRESHOLD))
            settings["sinkhorn"] = dataclasses.replace(base, **operator)
        return cls(**settings)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> RebasinConfig:
        """``PRESETS[name]`` with ``overrides`` (see :meth:`from_settings`) on top."""
        if name not in PRESETS:
            raise ValueError(f"unknown Re-basin preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls.from_settings(**{**PRESETS[name], **overrides})

    @staticmethod
    def setting_names() -> tuple[str, ...]:
        """The keywords :meth:`from_settings` takes."""
        return (*(f.name for f in dataclasses.fields(RebasinConfig)), *SINKHORN_SETTINGS)


#: the Sinkhorn operator's settings a strategy also takes as keywords
SINKHORN_SETTINGS = ("tau", "n_iter")


# name → (rule text, check); a None value is allowed only where the rule says so.
_REALS = {
    "alpha": ("a number in [0, 1]", lambda v: 0 <= v <= 1),
    "train_alpha": ("None or a number in [0, 1]", lambda v: 0 <= v <= 1),
    "beta": ("a number >= 0", lambda v: v >= 0),
    "tau_final": ("None or a number > 0", lambda v: v > 0),
    "perm_lr": ("a number > 0", lambda v: v > 0),
    "perm_weight_decay": ("a number >= 0", lambda v: v >= 0),
    "perm_init_noise": ("a number >= 0", lambda v: v >= 0),
    "delta_lr": ("a number >= 0", lambda v: v >= 0),
    "delta_clip": ("None or a number > 0", lambda v: v > 0),
    "delta_init_std": ("a number >= 0", lambda v: v >= 0),
}
_INTEGERS = {
    "rebasin_epochs": ("None or an integer >= 1", lambda v: v >= 1),
    "rebasin_steps": ("None or an integer >= 1", lambda v: v >= 1),
    "seed": ("an integer >= 0", lambda v: v >= 0),
    "diagnostic_samples": ("an integer >= 0", lambda v: v >= 0),
}
_BOOLEANS = ("straight_through", "warm_start", "penalty_after_clip", "permute", "bn_reestimate")
_CHOICES = {
    "perm_init": ("identity", "similarity"),
    "delta_optimizer": ("sgd", "adam"),
    "association": ("auto", "weight", "activation"),
}
_OPTIONAL = {f.name for f in dataclasses.fields(RebasinConfig) if "None" in str(f.type)}


def _validate(config: RebasinConfig) -> None:
    def bad(name: str, rule: str) -> ValueError:
        value = getattr(config, name)
        return ValueError(f"Re-basin: {name} must be {rule}, got {value!r} ({type(value).__name__}).")

    for name, (rule, ok) in _REALS.items():
        v = getattr(config, name)
        if v is None and name in _OPTIONAL:
            continue
        real = isinstance(v, numbers.Real) and not isinstance(v, bool)
        if not (real and math.isfinite(v) and ok(v)):
            raise bad(name, rule)
    for name, (rule, ok) in _INTEGERS.items():
        v = getattr(config, name)
        if v is None and name in _OPTIONAL:
            continue
        if not (isinstance(v, numbers.Integral) and not isinstance(v, bool) and ok(v)):
            raise bad(name, rule)
    for name in _BOOLEANS:
        if not isinstance(getattr(config, name), bool):
            raise bad(name, "True or False (a bool)")
    for name, choices in _CHOICES.items():
        if getattr(config, name) not in choices:
            raise bad(name, " or ".join(repr(c) for c in choices))


#: where the interpolation's data-driven alignments read batches
ALIGN_DATA = ("buffer", "experience", "both")


@dataclass(frozen=True)
class InterpolationConfig:
    """Every setting of align-then-interpolate, validated once:
    ``θ = (1 − α)·θ_old + α·π(θ_new)`` after each experience.

    Args:
        alpha: weight of the trained network, in [0, 1] (1: keep what was trained), or
            ``"auto"`` (the default): at each commit, the candidate of ``alpha_grid`` with
            the best experience-balanced accuracy on held-out samples (see
            :mod:`~avalanche_rebasin.continual.alpha_search`).
        alpha_grid: the candidates of ``"auto"``, each in [0, 1].
        holdout_samples: with ``"auto"``, this many samples of every experience (a seeded
            uniform choice) are withheld from its training and kept to choose α at every
            later commit; count them in the memory budget.
        holdout_fraction: with ``"auto"``, the share of the current experience withheld from
            its training to measure it at its own commit (at least ``holdout_samples``;
            only ``holdout_samples`` of them are kept afterwards).
        layer_alpha: module path → its own α (e.g. ``{"classifier": 1.0}``: the head from the
            trained network, the rest interpolated); the longest matching path wins.
        alignment: one of :data:`~avalanche_rebasin.continual.interpolation.ALIGNMENTS`.
        align_data: where the data-driven alignments and BatchNorm re-estimation read
            ``(x, y)`` batches: the replay ``buffer``, the ``experience``, or ``both``.
        align_samples: at most this many samples are read, with eval transforms (all of a
            source that fits; else a seeded uniform subset of it, buffer before experience).
        align_steps: the Sinkhorn alignments' step cap.
        bn_reestimate: re-estimate BatchNorm statistics of the committed network.
        restart: every experience after the first starts training from
            ``(1 − restart)·θ_old + restart·θ_init``, a fresh seeded initialisation
            (0: fine-tune θ_old, the default; 1: from scratch; see
            :mod:`avalanche_rebasin.continual.restart`). θ_old, the interpolation's anchor,
            is unchanged.
        seed: seeds the sample subsets, the Sinkhorn alignments and the restarts.
    """

    alpha: float | Literal["auto"] = "auto"
    alpha_grid: tuple[float, ...] = ALPHA_GRID
    holdout_samples: int = 20
    holdout_fraction: float = 0.05
    layer_alpha: Mapping[str, float] | None = None
    alignment: str = "weight_matching"
    align_data: str = "buffer"
    align_samples: int = 1000
    align_steps: int = 100
    bn_reestimate: bool = True
    restart: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.alpha, str) and self.alpha == "auto"):
            _check_fraction("alpha", self.alpha, ' or "auto"')
        grid = self.alpha_grid
        if isinstance(grid, str | bytes) or not isinstance(grid, Sequence) or not grid:
            raise ValueError(
                f"Interpolation: alpha_grid is a non-empty sequence of numbers in [0, 1], got {grid!r}."
            )
        for value in grid:
            _check_fraction("alpha_grid's values", value)
        if self.layer_alpha is not None and not isinstance(self.layer_alpha, Mapping):
            raise ValueError(
                "Interpolation: layer_alpha is a mapping of module path to α, e.g. "
                f"{{'classifier': 0.9}}, or None; got {self.layer_alpha!r}."
            )
        if not all(isinstance(path, str) for path in self.layer_alpha or {}):
            raise ValueError(f"Interpolation: layer_alpha's keys are module paths, got {self.layer_alpha!r}.")
        for path, value in (self.layer_alpha or {}).items():
            _check_fraction(f"layer_alpha[{path!r}]", value)
        _check_fraction("restart", self.restart)
        _check_fraction("holdout_fraction", self.holdout_fraction)
        for name, choices in (("alignment", ALIGNMENTS), ("align_data", ALIGN_DATA)):
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"Interpolation: {name} must be one of {list(choices)}, got {value!r}.")
        for name, low in (("align_samples", 1), ("align_steps", 1), ("holdout_samples", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Interpolation: {name} must be an integer >= {low}, got {value!r}.")
        if not isinstance(self.bn_reestimate, bool):
            raise ValueError(f"Interpolation: bn_reestimate must be True or False, got {self.bn_reestimate}.")
        if self.alpha != "auto":
            object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "alpha_grid", tuple(sorted(float(a) for a in grid)))
        object.__setattr__(self, "restart", float(self.restart))
        object.__setattr__(self, "holdout_fraction", float(self.holdout_fraction))
        if self.layer_alpha is not None:
            object.__setattr__(self, "layer_alpha", MappingProxyType(dict(self.layer_alpha)))

    @staticmethod
    def setting_names() -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(InterpolationConfig))


def _check_fraction(name: str, value: Any, alternative: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ValueError(f"Interpolation: {name} must be a number in [0, 1]{alternative}, got {value!r}.")

"""RebasinStrategy: Avalanche's supervised template plus :class:`RebasinPlugin`.

Built the way Avalanche builds EWC or LwF (template + plugin). The method itself lives in
:mod:`avalanche_rebasin.continual` (torch only); :mod:`avalanche_rebasin.plugin` adapts it.
Also :func:`atomic_save_checkpoint`: Avalanche's ``save_checkpoint`` written to a temporary
file beside the target and moved over it (a kill mid-save keeps the previous checkpoint).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch
from avalanche.checkpointing import save_checkpoint
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from ..continual.config import PRESETS, RebasinConfig
from ..continual.rebasin import ExperienceReport
from ..core.sinkhorn import Sinkhorn
from ..core.spec import PermutationSpec
from .checkpointing import (
    _OptimizerSnapshot,  # noqa: F401  (checkpoints pickled before it moved)
    optimizer_as_data,
    optimizer_from_data,
)
from .compatibility import check_plugins
from .keywords import declare_setting_keywords
from .plugin import RebasinPlugin, arrange_plugins

__all__ = [
    "PRESETS",
    "ExperienceReport",
    "RebasinConfig",
    "RebasinPlugin",
    "RebasinStrategy",
    "atomic_save_checkpoint",
]


def check_template_arguments(kwargs: dict[str, Any]) -> None:
    """Refuse, at construction, template arguments Avalanche would only trip over later (an
    ``evaluator=...`` placeholder crashed after the first experience)."""
    from avalanche.training.plugins import EvaluationPlugin

    evaluator = kwargs.get("evaluator")
    if evaluator is not None and not isinstance(evaluator, EvaluationPlugin) and not callable(evaluator):
        raise ValueError(
            f"RebasinStrategy: evaluator must be an avalanche EvaluationPlugin, a callable returning one, "
            f"or None, got {evaluator!r}."
        )
    for name in ("train_mb_size", "eval_mb_size"):
        value = kwargs.get(name, 1)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"RebasinStrategy: {name} must be an integer >= 1, got {value!r}.")
    criterion = kwargs.get("criterion")
    if criterion is not None and not callable(criterion):
        raise ValueError(
            f"RebasinStrategy: criterion must be callable (e.g. nn.CrossEntropyLoss()), got {criterion!r}."
        )
    if "device" in kwargs and kwargs["device"] is not None:
        try:
            torch.device(kwargs["device"])
        except (RuntimeError, TypeError) as err:
            raise ValueError(
                f"RebasinStrategy: device {kwargs['device']!r} is not a torch device ({err})."
            ) from None


class RebasinStrategy(SupervisedTemplate):
    """Incremental learning by re-basin (Guerrero Peña et al., CVPR 2023).

    The first experience trains ``model`` with ``optimizer``. Every later one trains a
    residual δ and Sinkhorn permutation logits on ``C((1 − a)θ_i + aπ_P(θ_i) + δ) + β‖δ‖²``
    and commits ``θ_{i+1} = (1 − α)θ_i + απ_P̂(θ_i) + δ`` into ``model``. During those
    experiences ``strategy.model`` is the network being trained (see :class:`RebasinPlugin`).

    Args:
        model: the network.
        optimizer: the optimiser of the first experience.
        config: a :class:`RebasinConfig`; or pass its fields (``alpha``, ``tau``,
            ``rebasin_epochs``, …) as keywords. A re-basin experience runs
            ``rebasin_epochs`` epochs, by default ``train_epochs``.
        spec: a PermutationSpec (default: discovered from the model at every experience).
        plugins: other Avalanche plugins; those that would be silently wrong with Re-basin
            (EWC, SI, MAS, GDumb, …) are refused here with the reason.
        **kwargs: the :class:`RebasinConfig` fields, and everything ``SupervisedTemplate``
            accepts (criterion, train_mb_size,
            train_epochs, eval_mb_size, device, evaluator, eval_every, …).
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: RebasinConfig | None = None,
        spec: PermutationSpec | None = None,
        plugins: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> None:
        fields = set(RebasinConfig.setting_names())
        settings = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
        epochs = kwargs.get("train_epochs", 1)
        if not (isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 1):
            raise ValueError(f"RebasinStrategy: train_epochs must be an integer >= 1, got {epochs!r}.")
        check_template_arguments(kwargs)
        self.rebasin = RebasinPlugin(config, spec=spec, **settings)
        check_plugins(plugins or [], owner="RebasinStrategy")
        super().__init__(model=model, optimizer=optimizer, plugins=[self.rebasin, *(plugins or [])], **kwargs)
        self.plugins = arrange_plugins(self.plugins, self.rebasin)  # type: ignore[has-type]

    @classmethod
    def from_preset(
        cls, name: str, *, model: nn.Module, optimizer: torch.optim.Optimizer, **kwargs: Any
    ) -> RebasinStrategy:
        """The settings of ``PRESETS[name]``; ``kwargs`` override them and pass the rest
        (``train_mb_size``, ``plugins``, …) on."""
        if name not in PRESETS:
            raise ValueError(f"RebasinStrategy: unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls(model=model, optimizer=optimizer, **{**PRESETS[name], **kwargs})

    @property
    def config(self) -> RebasinConfig:
        return self.rebasin.config

    @property
    def reports(self) -> list[ExperienceReport]:
        """Diagnostics of every committed experience (also published as ``Rebasin/*`` metrics)."""
        return self.rebasin.reports

    @property
    def rebasin_active(self) -> bool:
        return self.rebasin.active

    # -- checkpointing ---------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        if self.rebasin.active:
            raise RuntimeError("RebasinStrategy cannot be checkpointed in the middle of an experience.")
        return optimizer_as_data(self.__dict__, self.model)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(optimizer_from_data(state, state["model"]))


def atomic_save_checkpoint(
    strategy: Any, fname: str | os.PathLike[str], exclude: Collection[str] | None = None
) -> None:
    """``avalanche.checkpointing.save_checkpoint(strategy, fname, exclude)``, atomically: the
    file at ``fname`` is the previous checkpoint or the new one, never a part of either.

    Use it where you would call Avalanche's, e.g. after every ``strategy.train(exp)``; load
    with Avalanche's ``maybe_load_checkpoint`` as usual."""
    target = Path(fname)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(descriptor)
    try:
        save_checkpoint(strategy, temporary, exclude=exclude)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


declare_setting_keywords(RebasinStrategy, {**vars(Sinkhorn()), **vars(RebasinConfig())})

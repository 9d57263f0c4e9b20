"""Which Avalanche plugins Re-basin works with, and a clear refusal for the rest.

During a re-basin experience the strategy's model is a :class:`RebasinNetwork` whose
parameters are δ and the permutation logits. Plugins that act on the data, the outputs,
the loss or the current gradients work on it unchanged; plugins that compare
``strategy.model``'s parameters by name with values saved at an earlier experience, or
that reset the model, would silently do nothing or undo the method, so they are refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from avalanche.training import plugins as P
from avalanche.training.plugins.clock import Clock
from avalanche.training.templates.base_sgd import PeriodicEval

__all__ = ["SUPPORTED_PLUGINS", "SUPPORTED_SCHEDULERS", "check_plugins"]

#: Plugins tested with Re-basin (tests/test_strategy_plugins.py shows each one's effect).
SUPPORTED_PLUGINS: tuple[type, ...] = (
    P.ReplayPlugin,
    P.LwFPlugin,
    P.GEMPlugin,
    P.AGEMPlugin,
    P.EarlyStoppingPlugin,
    P.LRSchedulerPlugin,
    P.EvaluationPlugin,
    Clock,
    PeriodicEval,
)
#: LR schedulers an LRSchedulerPlugin may hold: during a re-basin experience they are
#: pointed at the δ/logit optimiser (each group from its own lr), then handed back.
SUPPORTED_SCHEDULERS: tuple[type, ...] = (
    torch.optim.lr_scheduler.StepLR,
    torch.optim.lr_scheduler.MultiStepLR,
    torch.optim.lr_scheduler.ExponentialLR,
    torch.optim.lr_scheduler.CosineAnnealingLR,
)

_BY_NAME = (
    "penalises strategy.model's parameters against the values it saved at the previous "
    "experience, matched by name; during a re-basin experience the trained parameters are δ "
    "and the permutation logits, so its penalty would silently be zero. Use Replay or LwF, "
    "or Re-basin's own penalty β‖δ‖² (beta=)"
)
_RESETS = (
    "re-initialises the model at every experience, while Re-basin builds each experience "
    "on the previous weights θ_i"
)
REFUSED: dict[type, str] = {
    P.EWCPlugin: _BY_NAME,
    P.SynapticIntelligencePlugin: _BY_NAME,
    P.MASPlugin: _BY_NAME,
    P.RWalkPlugin: _BY_NAME,
    P.CWRStarPlugin: "consolidates the classifier's weights by name across experiences, "
    "which the δ/logit parameters of a re-basin experience do not have",
    P.GDumbPlugin: _RESETS,
    P.FromScratchTrainingPlugin: _RESETS,
}


def _reason(plugin: Any) -> str | None:
    if isinstance(plugin, SUPPORTED_PLUGINS):
        if isinstance(plugin, P.LRSchedulerPlugin) and not isinstance(plugin.scheduler, SUPPORTED_SCHEDULERS):
            names = ", ".join(s.__name__ for s in SUPPORTED_SCHEDULERS)
            return (
                f"holds a {type(plugin.scheduler).__name__}, which cannot be re-pointed at the "
                f"δ/logit optimiser of a re-basin experience; use one of {names}"
            )
        return None
    for cls, reason in REFUSED.items():
        if isinstance(plugin, cls):
            return reason
    if type(plugin).__module__.startswith("avalanche."):
        supported = ", ".join(c.__name__ for c in SUPPORTED_PLUGINS[:6])
        return f"has not been verified with Re-basin (verified: {supported})"
    return None  # the user's own plugin: their responsibility


def check_plugins(plugins: Iterable[Any], owner: str = "Re-basin") -> None:
    """Raise ``ValueError`` naming every plugin that would be silently wrong with Re-basin."""
    problems = [f"{type(p).__name__} {reason}" for p in plugins if (reason := _reason(p)) is not None]
    if problems:
        raise ValueError(f"{owner} cannot be combined with: " + "; ".join(problems) + ".")

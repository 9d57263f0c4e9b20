"""Which Avalanche plugins Re-basin and weight interpolation work with, and a clear refusal
for the rest.

During a re-basin experience the strategy's model is a :class:`RebasinNetwork` whose
parameters are δ and the permutation logits. Plugins that act on the data, the outputs,
the loss or the current gradients work on it unchanged; plugins that compare
``strategy.model``'s parameters by name with values saved at an earlier experience, or
that reset the model, would silently do nothing or undo the method, so they are refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from avalanche.training import plugins as P
from avalanche.training.plugins.clock import Clock
from avalanche.training.templates.base_sgd import PeriodicEval

__all__ = [
    "AFTER_COMMIT",
    "SUPPORTED_PLUGINS",
    "SUPPORTED_SCHEDULERS",
    "SUPPORTED_WITH_INTERPOLATION",
    "check_interpolation_plugins",
    "check_plugins",
    "order_plugins",
]

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


def _listed_reason(plugin: Any, table: dict[type, str]) -> str | None:
    """The reason ``table`` gives for the first class ``plugin`` is an instance of."""
    return next((reason for cls, reason in table.items() if isinstance(plugin, cls)), None)


def _reason(plugin: Any) -> str | None:
    if isinstance(plugin, SUPPORTED_PLUGINS):
        if isinstance(plugin, P.LRSchedulerPlugin) and not isinstance(plugin.scheduler, SUPPORTED_SCHEDULERS):
            names = ", ".join(s.__name__ for s in SUPPORTED_SCHEDULERS)
            return (
                f"holds a {type(plugin.scheduler).__name__}, which cannot be re-pointed at the "
                f"δ/logit optimiser of a re-basin experience; use one of {names}"
            )
        return None
    if (reason := _listed_reason(plugin, REFUSED)) is not None:
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


# -- weight interpolation --------------------------------------------------------------------
# The interpolation plugin rewrites the model in after_training_exp. A plugin that keeps a copy
# or statistics of the model in its own after_training_exp (LwF's teacher, EWC's anchor) must run
# after the commit; the replay buffer the alignment reads must be updated before it. Plugins that
# reset or replace the model would make θ_old the initialisation; a second commit would change
# the formula.

#: Plugins tested with weight interpolation (tests/test_interpolation_plugins.py): those
#: verified with Re-basin, and EWC (its anchor is the committed model).
SUPPORTED_WITH_INTERPOLATION: tuple[type, ...] = (*SUPPORTED_PLUGINS, P.EWCPlugin)
#: Plugins that snapshot the model after an experience: they must come after the commit.
AFTER_COMMIT: tuple[type, ...] = (P.LwFPlugin, P.EWCPlugin)

_REPLACES_ANCHOR = (
    "resets or replaces the model before every experience, so the weights interpolated toward "
    "would be the initialisation instead of the previous experience's"
)
_TRAJECTORY = (
    "accumulates importance along the trained weights' trajectory, which the commit replaces; "
    "it has not been verified with weight interpolation (EWC and LwF have)"
)
_REFUSED_WITH_INTERPOLATION: dict[type, str] = {
    P.FromScratchTrainingPlugin: _REPLACES_ANCHOR,
    P.GDumbPlugin: _REPLACES_ANCHOR,
    P.SynapticIntelligencePlugin: _TRAJECTORY,
    P.RWalkPlugin: _TRAJECTORY,
    P.MASPlugin: "has not been verified with weight interpolation (EWC and LwF have)",
    P.CWRStarPlugin: "consolidates and resets the classifier by name at every experience, which "
    "the commit would mix with the previous one",
}


def order_plugins(plugins: Sequence[Any], interpolation: Any) -> list[Any]:
    """``plugins`` with ``interpolation`` after every other one except those that must see
    the committed model (:data:`AFTER_COMMIT`), which move after it in their own order."""
    after = [p for p in plugins if isinstance(p, AFTER_COMMIT)]
    return [*(p for p in plugins if not isinstance(p, AFTER_COMMIT)), interpolation, *after]


def _interpolation_reason(plugin: Any, position: int, at: int, restart: float) -> str | None:
    if (reason := _listed_reason(plugin, _REFUSED_WITH_INTERPOLATION)) is not None:
        return reason
    if isinstance(plugin, P.EarlyStoppingPlugin) and restart > 0:
        return (
            "restores the best weights it has seen, and its first snapshot pairs the previous model's "
            "score with the restart point, so with restart > 0 it can restore a fresh initialisation "
            "and the commit would interpolate toward it; use restart=0 or leave it out"
        )
    if isinstance(plugin, AFTER_COMMIT) and position < at:
        return (
            "keeps a copy of the model in after_training_exp and comes before the interpolation "
            "plugin, so it would keep the trained network instead of the committed one; put it after "
            "WeightInterpolationPlugin in plugins=[...] (InterpolationStrategy orders them for you)"
        )
    if isinstance(plugin, PeriodicEval) and position < at and plugin.eval_every >= 0:
        return "evaluates before the commit; add the interpolation plugin when the strategy is built"
    if isinstance(plugin, SUPPORTED_WITH_INTERPOLATION):
        return None
    if type(plugin).__module__.startswith("avalanche."):
        return "has not been verified with weight interpolation"
    return None  # the user's own plugin: their responsibility


def check_interpolation_plugins(plugins: Sequence[Any], interpolation: Any) -> None:
    """Raise ``ValueError`` naming every plugin that would be silently wrong beside
    ``interpolation`` (a second interpolation or Re-basin commit included)."""
    at = next(i for i, p in enumerate(plugins) if p is interpolation)
    restart = interpolation.config.restart
    problems = []
    if sum(p is interpolation for p in plugins) > 1:
        problems.append(
            "the same WeightInterpolationPlugin listed more than once (its hooks would run twice and "
            "commit twice); list it once"
        )
    for i, plugin in enumerate(plugins):
        if plugin is interpolation:
            continue
        if getattr(plugin, "commits_to_model", False):  # declared by RebasinPlugin and the like
            problems.append(
                f"{type(plugin).__name__} also rewrites the model after every experience, and the second "
                "commit would change the first's formula; use one of them"
            )
        elif (reason := _interpolation_reason(plugin, i, at, restart)) is not None:
            problems.append(f"{type(plugin).__name__} {reason}")
    if problems:
        raise ValueError("WeightInterpolationPlugin cannot be combined with: " + "; ".join(problems) + ".")

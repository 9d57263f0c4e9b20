"""Which Avalanche plugins weight interpolation works with, in which order, and a clear
refusal for the rest.

The interpolation plugin rewrites the model in ``after_training_exp``, after training. A
plugin that keeps a copy or statistics of the model in its own ``after_training_exp``
(LwF's teacher, EWC's anchor and Fisher information) must run after the commit, or it keeps
the network that was trained instead of the one that was committed; the replay buffer the
alignment reads must be updated before it. Plugins that reset or replace the model would
make θ_old the initialisation, and a second commit would change the formula.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from avalanche.training import plugins as P
from avalanche.training.templates.base_sgd import PeriodicEval

from .plugin import RebasinPlugin
from .plugin_compat import SUPPORTED_PLUGINS

__all__ = ["AFTER_COMMIT", "SUPPORTED_WITH_INTERPOLATION", "check_interpolation_plugins", "order_plugins"]

#: Plugins tested with weight interpolation (tests/test_interpolation_plugins.py): those
#: verified with Re-basin, and EWC (its anchor is the committed model).
SUPPORTED_WITH_INTERPOLATION: tuple[type, ...] = (*SUPPORTED_PLUGINS, P.EWCPlugin)
#: Plugins that snapshot the model after an experience: they must come after the commit.
AFTER_COMMIT: tuple[type, ...] = (P.LwFPlugin, P.EWCPlugin)

_RESETS = (
    "resets or replaces the model before every experience, so the weights interpolated toward "
    "would be the initialisation instead of the previous experience's"
)
_TRAJECTORY = (
    "accumulates importance along the trained weights' trajectory, which the commit replaces; "
    "it has not been verified with weight interpolation (EWC and LwF have)"
)
_REFUSED: dict[type, str] = {
    P.FromScratchTrainingPlugin: _RESETS,
    P.GDumbPlugin: _RESETS,
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


def _reason(plugin: Any, position: int, at: int) -> str | None:
    for cls, reason in _REFUSED.items():
        if isinstance(plugin, cls):
            return reason
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
    problems = []
    if sum(p is interpolation for p in plugins) > 1:
        problems.append(
            "the same WeightInterpolationPlugin listed more than once (its hooks would run twice and "
            "commit twice); list it once"
        )
    for i, plugin in enumerate(plugins):
        if plugin is interpolation:
            continue
        if isinstance(plugin, RebasinPlugin | type(interpolation)):
            problems.append(
                f"{type(plugin).__name__} also rewrites the model after every experience, and the second "
                "commit would change the first's formula; use one of them"
            )
        elif (reason := _reason(plugin, i, at)) is not None:
            problems.append(f"{type(plugin).__name__} {reason}")
    if problems:
        raise ValueError("WeightInterpolationPlugin cannot be combined with: " + "; ".join(problems) + ".")

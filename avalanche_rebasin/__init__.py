"""Re-basin via implicit Sinkhorn differentiation, for PyTorch and Avalanche.

The core does not depend on Avalanche. ``RebasinStrategy`` and ``RebasinPlugin`` (the
Avalanche adapter, :mod:`avalanche_rebasin.strategy`) are imported from here on first use,
so ``import avalanche_rebasin`` alone does not import Avalanche.
"""

from typing import Any

from .align import AlignResult, PermutationLogits, align
from .continual import ExperienceReport, RebasinNetwork
from .continual_config import PRESETS, RebasinConfig
from .costs import (
    CosineCost,
    L1Cost,
    L2Cost,
    MidpointCost,
    RandomPointCost,
    continual_cost,
    functional_loss,
    interpolate_state,
)
from .discovery import UnsupportedOperationError, discover_spec, register_rule
from .grouped_optimizer import GroupedOptimizer
from .lmc import LMCCurve, barrier_and_auc, interpolate, lmc_curve, reestimate_batchnorm
from .matching import activation_matching, straight_through, weight_matching
from .permute import (
    identity_permutation,
    invert_permutation,
    model_state,
    permute,
    permute_state,
    random_permutation,
    soft_permute_state,
)
from .sinkhorn import Sinkhorn, SinkhornOutput, hard_permutation, marginal_error, permutation_matrix
from .spec import AxisPermutation, PermutationSpec

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "AlignResult",
    "AxisPermutation",
    "CosineCost",
    "ExperienceReport",
    "GroupedOptimizer",
    "InterpolationStrategy",
    "L1Cost",
    "L2Cost",
    "LMCCurve",
    "MidpointCost",
    "PermutationLogits",
    "PermutationSpec",
    "RandomPointCost",
    "RebasinConfig",
    "RebasinNetwork",
    "RebasinPlugin",
    "RebasinStrategy",
    "Sinkhorn",
    "SinkhornOutput",
    "UnsupportedOperationError",
    "WeightInterpolationPlugin",
    "activation_matching",
    "align",
    "atomic_save_checkpoint",
    "barrier_and_auc",
    "continual_cost",
    "discover_spec",
    "functional_loss",
    "hard_permutation",
    "identity_permutation",
    "interpolate",
    "interpolate_state",
    "invert_permutation",
    "lmc_curve",
    "marginal_error",
    "model_state",
    "permutation_matrix",
    "permute",
    "permute_state",
    "random_permutation",
    "reestimate_batchnorm",
    "register_rule",
    "soft_permute_state",
    "straight_through",
    "weight_matching",
]


_AVALANCHE_EXPORTS = {
    "RebasinStrategy": "strategy",
    "RebasinPlugin": "plugin",
    "atomic_save_checkpoint": "strategy",
    "InterpolationStrategy": "interpolation_plugin",
    "WeightInterpolationPlugin": "interpolation_plugin",
}


def __getattr__(name: str) -> Any:
    """Import the Avalanche adapter only when it is asked for."""
    if name in _AVALANCHE_EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_AVALANCHE_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Re-basin via implicit Sinkhorn differentiation, for PyTorch and Avalanche.

The package has four parts, each a folder, each importing only the ones before it:

* :mod:`~avalanche_rebasin.core`: the Sinkhorn operator, permutation specs, states and costs;
* :mod:`~avalanche_rebasin.discovery`: which tensors share a permutation, by tracing;
* :mod:`~avalanche_rebasin.alignment`: aligning two models, and linear mode connectivity;
* :mod:`~avalanche_rebasin.continual`: the continual-learning methods, torch only;
* :mod:`~avalanche_rebasin.avalanche`: their Avalanche strategies and plugins.

The Avalanche adapter's names (``RebasinStrategy``, ``RebasinPlugin``, …) are imported on
first use, so ``import avalanche_rebasin`` alone does not import Avalanche.
"""

from typing import Any

from . import _moved
from .alignment import (
    AlignResult,
    LMCCurve,
    Stopping,
    activation_matching,
    align,
    barrier_and_auc,
    interpolate,
    lmc_curve,
    reestimate_batchnorm,
    straight_through,
    weight_matching,
)
from .continual import PRESETS, ExperienceReport, InterpolationConfig, RebasinConfig, RebasinNetwork
from .core import (
    AxisPermutation,
    CosineCost,
    L1Cost,
    L2Cost,
    MidpointCost,
    PermutationSpec,
    RandomPointCost,
    Sinkhorn,
    SinkhornOutput,
    WarmStart,
    hard_permutation,
    identity_permutation,
    invert_permutation,
    permute,
    permute_state,
    random_permutation,
)
from .discovery import UnsupportedOperationError, discover_spec, register_rule

__version__ = "0.2.0"

__all__ = [
    "PRESETS",
    "AlignResult",
    "AxisPermutation",
    "CosineCost",
    "ExperienceReport",
    "InterpolationConfig",
    "InterpolationStrategy",
    "L1Cost",
    "L2Cost",
    "LMCCurve",
    "MidpointCost",
    "PermutationSpec",
    "RandomPointCost",
    "RebasinConfig",
    "RebasinNetwork",
    "RebasinPlugin",
    "RebasinStrategy",
    "Sinkhorn",
    "SinkhornOutput",
    "Stopping",
    "UnsupportedOperationError",
    "WarmStart",
    "WeightInterpolationPlugin",
    "activation_matching",
    "align",
    "atomic_save_checkpoint",
    "barrier_and_auc",
    "discover_spec",
    "hard_permutation",
    "identity_permutation",
    "interpolate",
    "invert_permutation",
    "lmc_curve",
    "permute",
    "permute_state",
    "random_permutation",
    "reestimate_batchnorm",
    "register_rule",
    "straight_through",
    "weight_matching",
]

_AVALANCHE_NAMES = {
    "InterpolationStrategy",
    "RebasinPlugin",
    "RebasinStrategy",
    "WeightInterpolationPlugin",
    "atomic_save_checkpoint",
}

_moved.install()


def __getattr__(name: str) -> Any:
    """Import the Avalanche adapter only when it is asked for."""
    if name in _AVALANCHE_NAMES:
        from . import avalanche

        return getattr(avalanche, name)
    if name in _moved.MOVED_NAMES:
        return _moved.moved_name(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

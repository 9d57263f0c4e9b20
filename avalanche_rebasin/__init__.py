"""Re-basin via implicit Sinkhorn differentiation, for PyTorch and Avalanche.

The core (everything importable from here) does not depend on Avalanche; the
Avalanche strategy lives in :mod:`avalanche_rebasin.strategy`.
"""

from .align import AlignResult, PermutationLogits, align
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
from .lmc import LMCCurve, barrier_and_auc, interpolate, lmc_curve, reestimate_batchnorm
from .matching import weight_matching
from .permute import (
    identity_permutation,
    invert_permutation,
    model_state,
    permute,
    permute_state,
    random_permutation,
    soft_permute_state,
)
from .sinkhorn import Sinkhorn, hard_permutation, marginal_error, permutation_matrix
from .spec import AxisPermutation, PermutationSpec

__version__ = "0.1.0"

__all__ = [
    "AlignResult",
    "AxisPermutation",
    "CosineCost",
    "L1Cost",
    "L2Cost",
    "LMCCurve",
    "MidpointCost",
    "PermutationLogits",
    "PermutationSpec",
    "RandomPointCost",
    "Sinkhorn",
    "UnsupportedOperationError",
    "align",
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
    "weight_matching",
]

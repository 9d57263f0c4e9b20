"""The torch-only core: the Sinkhorn operator, permutation specs, permuting and mixing
states, and the re-basin costs. It knows nothing of how a spec is discovered."""

from .costs import CosineCost, L1Cost, L2Cost, MidpointCost, RandomPointCost
from .logits import PermutationLogits
from .permute import identity_permutation, invert_permutation, permute, permute_state, random_permutation
from .sinkhorn import (
    Sinkhorn,
    SinkhornOutput,
    WarmStart,
    hard_permutation,
    marginal_error,
    permutation_matrix,
)
from .spec import AxisPermutation, PermutationSpec
from .state import interpolate_state, mix, model_state

__all__ = [
    "AxisPermutation",
    "CosineCost",
    "L1Cost",
    "L2Cost",
    "MidpointCost",
    "PermutationLogits",
    "PermutationSpec",
    "RandomPointCost",
    "Sinkhorn",
    "SinkhornOutput",
    "WarmStart",
    "hard_permutation",
    "identity_permutation",
    "interpolate_state",
    "invert_permutation",
    "marginal_error",
    "mix",
    "model_state",
    "permutation_matrix",
    "permute",
    "permute_state",
    "random_permutation",
]

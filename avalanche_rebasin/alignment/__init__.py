"""Aligning two models (learned Sinkhorn, weight and activation matching) and linear mode
connectivity between them."""

from .align import AlignResult, align
from .convergence import Stopping
from .lmc import LMCCurve, barrier_and_auc, interpolate, lmc_curve, reestimate_batchnorm
from .matching import activation_matching, straight_through, weight_matching

__all__ = [
    "AlignResult",
    "LMCCurve",
    "Stopping",
    "activation_matching",
    "align",
    "barrier_and_auc",
    "interpolate",
    "lmc_curve",
    "reestimate_batchnorm",
    "straight_through",
    "weight_matching",
]

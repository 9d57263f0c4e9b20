"""The continual-learning methods without Avalanche: Re-basin's network of θ, δ and the
permutation logits, and align-then-interpolate with its restart."""

from .config import PRESETS, InterpolationConfig, RebasinConfig
from .rebasin import ExperienceReport, RebasinNetwork

__all__ = ["PRESETS", "ExperienceReport", "InterpolationConfig", "RebasinConfig", "RebasinNetwork"]

"""The Avalanche adapter, the only part of the package that imports Avalanche: the
plugins, the strategies, which other plugins they combine with, and checkpointing."""

from .interpolation_plugin import InterpolationStrategy, WeightInterpolationPlugin
from .plugin import RebasinPlugin
from .strategy import RebasinStrategy, atomic_save_checkpoint

__all__ = [
    "InterpolationStrategy",
    "RebasinPlugin",
    "RebasinStrategy",
    "WeightInterpolationPlugin",
    "atomic_save_checkpoint",
]

"""What the Avalanche plugins feed a model to discover its permutation spec."""

from __future__ import annotations

from typing import Any

import torch
from avalanche.models import MultiTaskModule
from avalanche.models.dynamic_modules import MultiHeadClassifier
from torch import nn

__all__ = ["example_input_of"]


def example_input_of(strategy: Any, model: nn.Module) -> Any:
    """One sample of the experience, with every task label the model knows if multi-task."""
    x = strategy.experience.dataset[0][0].unsqueeze(0).to(strategy.device)
    if not isinstance(model, MultiTaskModule):
        return x
    tasks = sorted(
        {int(t) for m in model.modules() if isinstance(m, MultiHeadClassifier) for t in m.classifiers}
        | set(strategy.experience.task_labels)
    )
    return (x.repeat(len(tasks), *([1] * (x.dim() - 1))), torch.tensor(tasks, device=strategy.device))

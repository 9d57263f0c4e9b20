"""One ``torch.optim.Optimizer`` whose parameter groups each keep their own algorithm."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["GroupedOptimizer"]


class GroupedOptimizer(torch.optim.Optimizer):
    """Several torch optimisers seen as one, e.g. Adam for the logits and SGD for δ.

    ``param_groups`` are the parts' own group dicts (an LR scheduler or a plugin that
    edits ``group["lr"]`` edits the part); ``step``, ``zero_grad`` and the state dict
    go through every part in order, so the numbers are exactly the parts' own.
    """

    def __init__(self, parts: Sequence[torch.optim.Optimizer]) -> None:
        if not parts:
            raise ValueError("GroupedOptimizer needs at least one optimiser.")
        self.parts = list(parts)
        super().__init__([g for part in self.parts for g in part.param_groups], defaults={})

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts:
            part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        parts = state_dict.get("parts")
        if parts is None or len(parts) != len(self.parts):
            raise ValueError("This state dict was not saved by a GroupedOptimizer with the same parts.")
        for part, state in zip(self.parts, parts):
            part.load_state_dict(state)

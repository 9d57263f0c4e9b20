"""Samples withheld from training, one group per experience, to choose α on (``alpha="auto"``).

At every experience, before its data loader is built, a seeded uniform choice of
``max(holdout_samples, ⌈holdout_fraction·n⌉)`` of its ``n`` samples is taken out of
``strategy.adapted_dataset``, with eval transforms: all of them measure the experience at
its own commit, and ``holdout_samples`` of them stay for every later one. Until the commit,
``strategy.experience`` is a copy of the experience that holds only the training part, so the
memories Avalanche fills from ``experience.dataset`` at the
experience's end (``ReplayPlugin``, DER) never store a held-out sample: no network trains on
one, then or later. ER-ACE fills its memory at the experience's start, before the split, so
there a held-out sample of the current experience can be replayed (with the memory's share
of the experience as its chance). The user's experience object is not touched.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

__all__ = ["HeldOutMemory"]


class HeldOutMemory:
    """The held-out samples of every experience seen, as ``(x, y)`` tensors on the CPU."""

    def __init__(self) -> None:
        self.groups: list[tuple[Tensor, Tensor]] = []
        self._experience: Any = None  # the strategy's own experience while a copy stands in

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_experience": None}

    def withhold(self, strategy: Any, samples: int, fraction: float, seed: int) -> None:
        """Move ``max(samples, ⌈fraction·n⌉)`` samples of ``strategy.adapted_dataset`` into a new
        group, and let ``strategy.experience`` show only the rest until :meth:`release`."""
        dataset, experience = strategy.adapted_dataset, strategy.experience
        if len(dataset) != len(experience.dataset):
            raise ValueError(
                "WeightInterpolationPlugin(alpha='auto'): a plugin changed the experience's training "
                f"data ({len(experience.dataset)} samples, {len(dataset)} after adaptation), so the held-out "
                "samples could not be kept out of the replay memory. Pass a fixed alpha."
            )
        withheld = max(samples, math.ceil(fraction * len(dataset)))
        if len(dataset) <= withheld:
            raise ValueError(
                f"WeightInterpolationPlugin(alpha='auto'): experience {len(self.groups)} has {len(dataset)} "
                f"training samples; withholding {withheld} of them (holdout_samples={samples}, "
                f"holdout_fraction={fraction}) to choose α would leave none to train on. Pass a smaller "
                "holdout_samples or holdout_fraction, or a fixed alpha."
            )
        generator = torch.Generator().manual_seed(2_000_003 * seed + len(self.groups))
        order = torch.randperm(len(dataset), generator=generator)
        held, kept = order[:withheld].tolist(), order[withheld:].sort().values.tolist()
        with torch.random.fork_rng(devices=[]):  # reading a sample may draw (RandomRotation): not from yours
            xs, ys = [], []
            for batch in DataLoader(dataset.subset(held).eval(), batch_size=256, shuffle=False):
                xs.append(batch[0])
                ys.append(batch[1])
        self.groups.append((torch.cat(xs), torch.cat(ys)))
        strategy.adapted_dataset = dataset.subset(kept)
        training_part = copy.copy(experience)
        training_part._dataset = experience.dataset.subset(kept)
        self._experience, strategy.experience = experience, training_part

    def release(self, strategy: Any) -> None:
        """Give the strategy its own experience back."""
        if self._experience is not None:
            strategy.experience, self._experience = self._experience, None

    def keep(self, samples: int) -> None:
        """After the commit: the current experience keeps the first ``samples`` it withheld."""
        if self.groups:
            x, y = self.groups[-1]
            self.groups[-1] = (x[:samples], y[:samples])

    def truncate(self, experiences: int) -> None:
        """Keep the groups of the first ``experiences`` experiences (after a rollback)."""
        del self.groups[experiences:]

    def batches(self, device: Any, batch_size: int) -> list[list[tuple[Tensor, Tensor]]]:
        """Every group as ``(x, y)`` batches on ``device``."""
        return [
            [
                (x[i : i + batch_size].to(device), y[i : i + batch_size].to(device))
                for i in range(0, len(y), batch_size)
            ]
            for x, y in self.groups
        ]

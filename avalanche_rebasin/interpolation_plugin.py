"""Weight interpolation as an Avalanche plugin, and the strategy that is a template plus it.

Every experience trains the model as the template would (with replay if a ``ReplayPlugin``
is given). At its end the plugin aligns the trained network to the weights the experience
started from and commits ``θ = (1 − α)·θ_old + α·π(θ_new)`` into the user's module, then
re-estimates BatchNorm statistics on the alignment data (see
:mod:`avalanche_rebasin.interpolation`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from avalanche.models import MultiTaskModule
from avalanche.training.plugins import ReplayPlugin, SupervisedPlugin
from avalanche.training.templates import SupervisedTemplate
from torch import nn
from torch.utils.data import DataLoader

from .continual import _groups_touching
from .interpolation import ALIGNMENTS, NEEDS_DATA, InterpolationReport, interpolated_state, timed_alignment
from .lmc import reestimate_batchnorm
from .permute import identity_permutation, load_state_, model_state, private_copy
from .plugin import RebasinPlugin, _example_input
from .restart import fresh_initialisation, restart_state
from .spec import PermutationSpec

__all__ = ["InterpolationStrategy", "WeightInterpolationPlugin"]

ALIGN_DATA = ("buffer", "experience", "both")


class WeightInterpolationPlugin(SupervisedPlugin):
    """Align the trained network to the previous experience's weights, then interpolate.

    Args:
        alpha: weight of the trained network, in [0, 1] (1: keep what was trained).
        alignment: one of :data:`~avalanche_rebasin.interpolation.ALIGNMENTS`.
        align_data: where the data-driven alignments and BatchNorm re-estimation read
            ``(x, y)`` batches: the replay ``buffer`` (needs a ``ReplayPlugin`` before this
            plugin), the ``experience``, or ``both``.
        align_samples: at most this many samples are read, with eval transforms (all of a
            source that fits; else a seeded uniform subset of it, buffer before experience).
        align_steps: the Sinkhorn alignments' step cap.
        bn_reestimate: re-estimate BatchNorm statistics of the committed network.
        restart: every experience after the first starts training from
            ``(1 − restart)·θ_old + restart·θ_init``, a fresh seeded initialisation
            (0: fine-tune θ_old, the default; 1: from scratch; see
            :mod:`avalanche_rebasin.restart`). θ_old, the interpolation's anchor, is unchanged.
        spec: a PermutationSpec (default: discovered from the model at every commit).
    """

    def __init__(
        self,
        *,
        alpha: float = 0.5,
        alignment: str = "weight_matching",
        align_data: str = "buffer",
        align_samples: int = 1000,
        align_steps: int = 100,
        bn_reestimate: bool = True,
        restart: float = 0.0,
        spec: PermutationSpec | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _check_settings(alpha, alignment, align_data, align_samples, align_steps, bn_reestimate, seed)
        _check_fraction("restart", restart)
        self.restart = float(restart)
        self.alpha, self.alignment, self.align_data = float(alpha), alignment, align_data
        self.align_samples, self.align_steps, self.bn_reestimate = align_samples, align_steps, bn_reestimate
        self.spec, self.seed = spec, seed
        self.reports: list[InterpolationReport] = []
        self._previous: dict[str, torch.Tensor] | None = None
        self._experiences = 0

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        _check_composition(self, strategy)
        model = strategy.model
        if isinstance(model, MultiTaskModule):
            raise ValueError(
                "WeightInterpolationPlugin: multi-task models are not supported yet (task-aware alignment "
                "data and heads are unverified); use a single-head model."
            )
        self._previous = (
            {k: v.detach().clone() for k, v in model_state(model).items()} if self._experiences else None
        )
        if self._previous is not None and self.restart > 0:
            self._restart(model, self._previous)

    def _restart(self, model: nn.Module, previous: dict[str, torch.Tensor]) -> None:
        """Move the model to ``(1 − r)·θ_old + r·θ_init`` before it trains (in place)."""
        fresh = fresh_initialisation(model, seed=1_000_003 * self.seed + self._experiences)
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        kept = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(fresh[n], p)]
        if kept:
            warnings.warn(
                f"WeightInterpolationPlugin(restart={self.restart}): {len(kept)} trainable parameter(s) "
                f"have no reset_parameters() in their module and keep their previous values: {kept[:3]}",
                stacklevel=2,
            )
        load_state_(model, restart_state(previous, fresh, self.restart, frozen))

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._experiences += 1
        if self._previous is None:
            return
        model, previous = strategy.model, self._previous
        self._previous = None
        spec = self.spec or PermutationSpec.from_model(model, _example_input(strategy, model))
        data = _alignment_batches(self, strategy) if self._needs_data(model) else []
        old = load_state_(private_copy(model), previous)
        perms, seconds = timed_alignment(
            old, model, spec, self.alignment, data=data, alpha=self.alpha, steps=self.align_steps,
            seed=self.seed, loss_fn=_loss(strategy),
        )  # fmt: skip
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        identity = identity_permutation(spec, device=next(iter(perms.values())).device if perms else None)
        perms = {g: identity[g] if g in _groups_touching(spec, frozen) else p for g, p in perms.items()}
        load_state_(model, interpolated_state(previous, model_state(model), spec, perms, self.alpha, frozen))
        if self.bn_reestimate and data:
            reestimate_batchnorm(model, [x for x, _ in data])
        moved = sum(int((p != identity[g]).sum()) for g, p in perms.items())
        self.reports.append(
            InterpolationReport(
                self._experiences - 1, self.alignment, self.alpha, moved, sum(spec.group_sizes.values()),
                seconds, sum(len(y) for _, y in data),
            )
        )  # fmt: skip

    def _needs_data(self, model: nn.Module) -> bool:
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        return self.alignment in NEEDS_DATA or (self.bn_reestimate and has_bn)


def _check_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ValueError(f"WeightInterpolationPlugin: {name} must be a number in [0, 1], got {value!r}.")


def _check_settings(
    alpha: Any, alignment: Any, align_data: Any, samples: Any, steps: Any, bn: Any, seed: Any
) -> None:
    """Raise ``ValueError`` naming the first setting of the wrong type or range."""
    owner = "WeightInterpolationPlugin"
    _check_fraction("alpha", alpha)
    for name, value, choices in (
        ("alignment", alignment, ALIGNMENTS),
        ("align_data", align_data, ALIGN_DATA),
    ):
        if value not in choices:
            raise ValueError(f"{owner}: {name} must be one of {list(choices)}, got {value!r}.")
    for name, value, low in (("align_samples", samples, 1), ("align_steps", steps, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{owner}: {name} must be an integer >= {low}, got {value!r}.")
    if not isinstance(bn, bool):
        raise ValueError(f"{owner}: bn_reestimate must be True or False, got {bn!r}.")


def _check_composition(plugin: WeightInterpolationPlugin, strategy: Any) -> None:
    """Refuse what would be silently wrong: a second commit (Re-basin's) or a buffer updated
    after this plugin read it."""
    plugins = list(strategy.plugins)
    if any(isinstance(p, RebasinPlugin) for p in plugins):
        raise ValueError(
            "WeightInterpolationPlugin cannot be combined with RebasinPlugin: both rewrite the model "
            "after every experience, and the second would undo the first's formula. Use one of them."
        )
    replays = [i for i, p in enumerate(plugins) if isinstance(p, ReplayPlugin)]
    at = plugins.index(plugin)
    if plugin.align_data in ("buffer", "both") and not replays:
        raise ValueError(
            "WeightInterpolationPlugin(align_data='buffer') needs a ReplayPlugin in the strategy; add one "
            "or pass align_data='experience'."
        )
    if any(i > at for i in replays):
        raise ValueError(
            "WeightInterpolationPlugin must come after ReplayPlugin in plugins=[...]: the buffer it aligns "
            "on is updated in ReplayPlugin.after_training_exp."
        )


def _alignment_batches(plugin: WeightInterpolationPlugin, strategy: Any) -> list[tuple[Any, Any]]:
    """Up to ``align_samples`` samples as ``(x, y)`` batches on the strategy's device."""
    sources = []
    if plugin.align_data in ("buffer", "both"):
        replay = next(p for p in strategy.plugins if isinstance(p, ReplayPlugin))
        sources.append(replay.storage_policy.buffer)
    if plugin.align_data in ("experience", "both"):
        sources.append(strategy.experience.dataset)
    batches, left = [], plugin.align_samples
    generator = torch.Generator().manual_seed(1_000_003 * plugin.seed + plugin._experiences)
    for dataset in sources:
        dataset = dataset.eval()
        if len(dataset) > left > 0:  # a seeded uniform subset, not the first (oldest) samples
            dataset = dataset.subset(
                torch.randperm(len(dataset), generator=generator)[:left].sort().values.tolist()
            )
        loader = DataLoader(dataset, batch_size=strategy.train_mb_size, shuffle=False)
        for batch in loader:
            if left <= 0:
                break
            x, y = batch[0][:left].to(strategy.device), batch[1][:left].to(strategy.device)
            batches.append((x, y))
            left -= len(y)
    return batches


def _loss(strategy: Any):
    criterion = strategy._criterion
    return criterion if callable(criterion) else nn.functional.cross_entropy


class InterpolationStrategy(SupervisedTemplate):
    """A supervised template plus :class:`WeightInterpolationPlugin` (placed after the given
    plugins, so a ``ReplayPlugin``'s buffer is up to date when it is read).

    Args:
        model, optimizer: as for any Avalanche strategy.
        alpha, alignment, align_data, align_samples, align_steps, bn_reestimate, restart, spec,
            seed: see :class:`WeightInterpolationPlugin`.
        plugins: other Avalanche plugins (a ``ReplayPlugin`` for ``align_data="buffer"``).
        **base_kwargs: everything ``SupervisedTemplate`` accepts.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        alpha: float = 0.5,
        alignment: str = "weight_matching",
        align_data: str = "buffer",
        align_samples: int = 1000,
        align_steps: int = 100,
        bn_reestimate: bool = True,
        restart: float = 0.0,
        spec: PermutationSpec | None = None,
        seed: int = 0,
        plugins: Sequence[Any] | None = None,
        **base_kwargs: Any,
    ) -> None:
        self.interpolation = WeightInterpolationPlugin(
            alpha=alpha, alignment=alignment, align_data=align_data, align_samples=align_samples,
            align_steps=align_steps, bn_reestimate=bn_reestimate, restart=restart, spec=spec, seed=seed,
        )  # fmt: skip
        plugins = [*(plugins or []), self.interpolation]
        super().__init__(model=model, optimizer=optimizer, plugins=plugins, **base_kwargs)

"""Weight interpolation as an Avalanche plugin, and the strategy that is a template plus it.

Every experience trains the model as the template would (with replay if a ``ReplayPlugin``
is given). At its end the plugin aligns the trained network to the weights the experience
started from and commits ``θ = (1 − α)·θ_old + α·π(θ_new)`` into the user's module, then
re-estimates BatchNorm statistics on the alignment data (see
:mod:`avalanche_rebasin.continual.interpolation`). Every experience is a transaction
(:mod:`avalanche_rebasin.avalanche.transaction`): on any exception or Ctrl-C inside it, the user's module
and optimiser return to the experience's start, so does the plugin's state, and the error
propagates.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from avalanche.models import MultiTaskModule
from avalanche.training.plugins import ReplayPlugin, SupervisedPlugin
from avalanche.training.templates import SupervisedTemplate
from avalanche.training.templates.base_sgd import PeriodicEval
from torch import nn
from torch.utils.data import DataLoader

from ..alignment.lmc import reestimate_batchnorm
from ..continual.interpolation import (
    ALIGNMENTS,
    NEEDS_DATA,
    InterpolationReport,
    interpolated_state,
    tensor_aliases,
    tensor_alphas,
    timed_alignment,
)
from ..continual.restart import fresh_initialisation, restart_seed, restart_state
from ..core.permute import identity_permutation
from ..core.spec import PermutationSpec
from ..core.state import load_state_, model_state, private_copy
from ..core.validation import check_finite
from ..discovery import discover_spec
from .checkpointing import optimizer_as_data, optimizer_from_data
from .compatibility import check_interpolation_plugins, order_plugins
from .inputs import example_input_of
from .transaction import ExperienceSnapshot, guard_experiences, release_experiences

__all__ = ["InterpolationStrategy", "WeightInterpolationPlugin"]

ALIGN_DATA = ("buffer", "experience", "both")


class WeightInterpolationPlugin(SupervisedPlugin):
    """Align the trained network to the previous experience's weights, then interpolate.

    Args:
        alpha: weight of the trained network, in [0, 1] (1: keep what was trained).
        layer_alpha: module path → its own α (e.g. ``{"classifier": 1.0}``: the head from the
            trained network, the rest interpolated); the longest matching path wins.
        alignment: one of :data:`~avalanche_rebasin.continual.interpolation.ALIGNMENTS`.
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
            :mod:`avalanche_rebasin.continual.restart`). θ_old, the interpolation's anchor, is unchanged.
        spec: a PermutationSpec (default: discovered from the model at every commit).
    """

    commits_to_model = True  # rewrites the model after each experience (see plugin_compat)
    _snapshot: tuple[ExperienceSnapshot, int, int] | None = None  # for checkpoints that predate it

    def __init__(
        self,
        *,
        alpha: float = 0.5,
        layer_alpha: Mapping[str, float] | None = None,
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
        _check_fractions(restart, layer_alpha)
        self.restart, self.layer_alpha = float(restart), dict(layer_alpha) if layer_alpha is not None else {}
        self.alpha, self.alignment, self.align_data = float(alpha), alignment, align_data
        self.align_samples, self.align_steps, self.bn_reestimate = align_samples, align_steps, bn_reestimate
        self.spec, self.seed = spec, seed
        self.reports: list[InterpolationReport] = []
        self._previous: dict[str, torch.Tensor] | None = None
        self._alphas: float | dict[str, float] = float(alpha)
        self._experiences = 0
        self._snapshot: tuple[ExperienceSnapshot, int, int] | None = None  # start, experiences, reports

    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        guard_experiences(strategy, self)

    def after_training(self, strategy: Any, **kwargs: Any) -> None:
        release_experiences(strategy)

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        _check_composition(self, strategy)
        model = strategy.model
        check_finite(model_state(model), "the model", {n for n, _ in model.named_buffers()})
        with torch.random.fork_rng(devices=[]):  # reading a sample may draw (RandomRotation): not from yours
            _discover_spec(self, strategy, model)  # refuses an unsupported model before training
        self._alphas = tensor_alphas(model_state(model), self.alpha, self.layer_alpha, tensor_aliases(model))
        start = ExperienceSnapshot.take(model)
        self._snapshot = (start, self._experiences, len(self.reports))
        self._previous = start.state if self._experiences else None  # read only: shared with the snapshot
        if self._previous is not None and self.restart > 0:
            _restart(self, model, self._previous)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._experiences += 1
        if self._previous is None:
            return
        model, previous = strategy.model, self._previous
        spec = _discover_spec(self, strategy, model)  # again on the trained model, as the commit reads it
        self._previous = None
        data = _alignment_batches(self, strategy) if self._needs_data(model) else []
        old, new = (
            _without_dropout(load_state_(private_copy(model), previous)),
            _without_dropout(private_copy(model)),
        )
        perms, seconds = timed_alignment(
            old, new, spec, self.alignment, data=data, alpha=self._alphas, steps=self.align_steps,
            seed=self.seed, loss_fn=_loss(strategy),
        )  # fmt: skip
        frozen = _frozen(model)
        identity = identity_permutation(spec)
        perms = {g: identity[g] if g in spec.groups_touching(frozen) else p for g, p in perms.items()}
        committed = load_state_(  # built on a copy: the user's module changes only once it is complete
            new, interpolated_state(previous, model_state(model), spec, perms, self._alphas, frozen)
        )
        if self.bn_reestimate and data and not _at_an_end(self._alphas):
            reestimate_batchnorm(committed, [x for x, _ in data])
            load_state_(committed, {k: v for k, v in previous.items() if k in frozen})
        load_state_(model, model_state(committed))
        _evaluate_the_commit(strategy)
        moved = sum(int((p.cpu() != identity[g]).sum()) for g, p in perms.items())
        self.reports.append(
            InterpolationReport(
                self._experiences - 1, self.alignment, self.alpha, moved, sum(spec.group_sizes.values()),
                seconds, sum(len(y) for _, y in data),
            )
        )  # fmt: skip

    def rollback(self, strategy: Any) -> None:
        """After an error inside the experience: the user's module and optimiser, the counter
        and the reports as the experience found them."""
        snapshot, self._snapshot, self._previous = self._snapshot, None, None
        if snapshot is not None:
            start, self._experiences, reports = snapshot
            start.restore()
            del self.reports[reports:]

    def commit(self) -> None:
        self._snapshot = None

    def _needs_data(self, model: nn.Module) -> bool:
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        return self.alignment in NEEDS_DATA or (self.bn_reestimate and has_bn)


def _discover_spec(plugin: WeightInterpolationPlugin, strategy: Any, model: nn.Module) -> PermutationSpec:
    """The given spec, else the model's; plain averaging (``"none"``) needs none and falls
    back to the empty spec on a model discovery refuses."""
    if plugin.spec is not None:
        return plugin.spec
    try:
        return discover_spec(model, example_input_of(strategy, model))
    except ValueError:
        if plugin.alignment != "none":
            raise
        return PermutationSpec(group_sizes={}, axes={})


def _restart(plugin: WeightInterpolationPlugin, model: nn.Module, previous: dict[str, torch.Tensor]) -> None:
    """Move the model to ``(1 − r)·θ_old + r·θ_init`` before it trains (in place)."""
    fresh = fresh_initialisation(model, seed=restart_seed(plugin.seed, plugin._experiences))
    kept = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(fresh[n], p)]
    if kept:
        warnings.warn(
            f"WeightInterpolationPlugin(restart={plugin.restart}): {len(kept)} trainable parameter(s) "
            f"were not re-drawn (no reset_parameters() in their module, or a parametrization's originals "
            f"such as weight_norm's) and keep their previous values: {kept[:3]}",
            stacklevel=3,
        )
    load_state_(model, restart_state(previous, fresh, plugin.restart, _frozen(model)))


def _check_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ValueError(f"WeightInterpolationPlugin: {name} must be a number in [0, 1], got {value!r}.")


def _check_fractions(restart: Any, layer_alpha: Any) -> None:
    if layer_alpha is not None and not isinstance(layer_alpha, Mapping):
        raise ValueError(
            "WeightInterpolationPlugin: layer_alpha is a mapping of module path to α, e.g. "
            f"{{'classifier': 0.9}}, or None; got {layer_alpha!r}."
        )
    if not all(isinstance(path, str) for path in layer_alpha or {}):
        raise ValueError(
            f"WeightInterpolationPlugin: layer_alpha's keys are module paths (str), got {layer_alpha!r}."
        )
    for name, value in (
        ("restart", restart),
        *((f"layer_alpha[{k!r}]", v) for k, v in (layer_alpha or {}).items()),
    ):
        _check_fraction(name, value)


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
    """Refuse what would be silently wrong: a second commit, a plugin that resets the model or
    snapshots it before the commit (see :mod:`.plugin_compat`), or a buffer updated
    after this plugin read it."""
    if isinstance(strategy.model, MultiTaskModule):
        raise ValueError(
            "WeightInterpolationPlugin: multi-task models are not supported yet (task-aware alignment "
            "data and heads are unverified); use a single-head model."
        )
    if plugin._needs_data(strategy.model) and plugin.bn_reestimate and plugin.align_samples < 2:
        raise ValueError(
            "WeightInterpolationPlugin: BatchNorm statistics cannot be re-estimated on one sample; "
            "pass align_samples >= 2 or bn_reestimate=False."
        )
    plugins = list(strategy.plugins)
    check_interpolation_plugins(plugins, plugin)
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
    return _without_single_samples(batches)


def _without_single_samples(batches: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Every batch of one sample joined to its neighbour (BatchNorm cannot read it alone)."""
    out: list[tuple[Any, Any]] = []
    for x, y in batches:
        if out and (len(y) == 1 or len(out[-1][1]) == 1):
            x0, y0 = out.pop()
            x, y = torch.cat([x0, x]), torch.cat([y0, y])
        out.append((x, y))
    return out


def _at_an_end(alphas: float | Mapping[str, float]) -> bool:
    """Every tensor at α = 0 or every one at α = 1: the commit is that network itself,
    BatchNorm statistics included, so they are not re-estimated."""
    values = set(alphas.values()) if isinstance(alphas, Mapping) else {alphas}
    return values <= {0.0} or values <= {1.0}


def _frozen(model: nn.Module) -> set[str]:
    """Names of the frozen parameters (``requires_grad=False``), and of the statistics of every
    normalisation layer whose parameters are all frozen (one without parameters follows its
    parent module's): a frozen block keeps θ_old's."""
    modules = dict(model.named_modules())
    names = {n for n, p in model.named_parameters() if not p.requires_grad}

    def all_frozen(module: nn.Module, recurse: bool) -> bool:
        params = list(module.parameters(recurse=recurse))
        return bool(params) and all(not p.requires_grad for p in params)

    for path, module in modules.items():
        if not isinstance(module, nn.modules.batchnorm._NormBase):
            continue
        parent = modules[path.rsplit(".", 1)[0] if "." in path else ""]
        if all_frozen(module, False) or (not module.affine and path and all_frozen(parent, True)):
            prefix = f"{path}." if path else ""
            names |= {prefix + n for n, _ in module.named_buffers(recurse=False)}
    return names


def _without_dropout(model: nn.Module) -> nn.Module:
    """``model`` (a private copy) with its dropout layers in eval mode: the alignment's
    activations and task loss are then deterministic, and the global generator untouched."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.eval()
    return model


def _evaluate_the_commit(strategy: Any) -> None:
    """Make Avalanche's periodic evaluation run its end-of-experience pass on the committed
    model: it skips that pass when the last epoch was just evaluated, before the commit."""
    for plugin in strategy.plugins:
        if isinstance(plugin, PeriodicEval):
            plugin.do_final = plugin.eval_every >= 0


def _loss(strategy: Any):
    criterion = strategy._criterion
    return criterion if callable(criterion) else nn.functional.cross_entropy


class InterpolationStrategy(SupervisedTemplate):
    """A supervised template plus :class:`WeightInterpolationPlugin`, placed after the given
    plugins (a ``ReplayPlugin``'s buffer is then up to date when it is read) except LwF and
    EWC, which move after it so that they keep the committed model.

    Args:
        model, optimizer: as for any Avalanche strategy.
        alpha, layer_alpha, alignment, align_data, align_samples, align_steps, bn_reestimate,
            restart, spec, seed: see :class:`WeightInterpolationPlugin`.
        plugins: other Avalanche plugins (a ``ReplayPlugin`` for ``align_data="buffer"``).
        **base_kwargs: everything ``SupervisedTemplate`` accepts.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        alpha: float = 0.5,
        layer_alpha: Mapping[str, float] | None = None,
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
            alpha=alpha, layer_alpha=layer_alpha, alignment=alignment, align_data=align_data,
            align_samples=align_samples, align_steps=align_steps, bn_reestimate=bn_reestimate,
            restart=restart, spec=spec, seed=seed,
        )  # fmt: skip
        plugins = order_plugins(plugins or [], self.interpolation)
        super().__init__(model=model, optimizer=optimizer, plugins=plugins, **base_kwargs)

    def __getstate__(self) -> dict[str, Any]:  # Avalanche's save_checkpoint, between experiences
        if self.interpolation._previous is not None:
            raise RuntimeError("InterpolationStrategy cannot be checkpointed in the middle of an experience.")
        return optimizer_as_data(self.__dict__, self.model)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(optimizer_from_data(state, state["model"]))

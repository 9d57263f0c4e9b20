"""Weight interpolation as an Avalanche plugin, and the strategy that is a template plus it.

Every experience trains the model as the template would (with replay if a ``ReplayPlugin``
is given, or the template's own memory: Avalanche's ``DER`` and ``ER_ACE``).
At its end the plugin aligns the trained network to the weights the experience started
from and commits ``θ = (1 − α)·θ_old + α·π(θ_new)`` into the user's module, then
re-estimates BatchNorm statistics on the alignment data (see
:mod:`avalanche_rebasin.continual.interpolation`); with ``alpha="auto"`` α is chosen there
on samples withheld from training (:mod:`.holdout`,
:mod:`avalanche_rebasin.continual.alpha_search`). Every experience is a transaction
(:mod:`avalanche_rebasin.avalanche.transaction`): on any exception or Ctrl-C inside it, the
user's module and optimiser return to the experience's start, so does the plugin's state,
and the error propagates.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from avalanche.models import MultiTaskModule
from avalanche.training.plugins import ReplayPlugin, SupervisedPlugin
from avalanche.training.supervised import DER, ER_ACE
from avalanche.training.templates import SupervisedTemplate
from avalanche.training.templates.base_sgd import PeriodicEval
from torch import nn
from torch.utils.data import DataLoader

from ..alignment.lmc import reestimate_batchnorm
from ..continual.alpha_search import AlphaSearch, choose_alpha
from ..continual.config import InterpolationConfig
from ..continual.interpolation import (
    NEEDS_DATA,
    InterpolationReport,
    interpolate_aligned,
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
from .holdout import HeldOutMemory
from .inputs import example_input_of
from .keywords import declare_setting_keywords
from .transaction import ExperienceSnapshot, guard_experiences, release_experiences

__all__ = ["BUFFERED_TEMPLATES", "InterpolationStrategy", "WeightInterpolationPlugin"]

#: Avalanche templates that keep their replay memory themselves (``strategy.storage_policy``)
#: and have added the current experience to it by the time the commit reads it: DER in its
#: ``_after_training_exp``, before the plugins' hooks; ER-ACE in ``_before_training_exp``.
#: (ER-AML fills its memory as ER-ACE does but is not tested with the plugin, so not listed.)
#: DER's stored logits stay those of the trained network (DER++ records the network it
#: trains, Buzzega et al. 2020); the commit does not rewrite them.
BUFFERED_TEMPLATES: tuple[type, ...] = (DER, ER_ACE)


class WeightInterpolationPlugin(SupervisedPlugin):
    """Align the trained network to the previous experience's weights, then interpolate.

    Args:
        config: an :class:`InterpolationConfig`; or pass its fields (``alpha``,
            ``alignment``, ``align_data``, …) as keywords. ``align_data="buffer"`` reads
            the replay memory: a ``ReplayPlugin`` before this plugin, or the template's own
            (:data:`BUFFERED_TEMPLATES`).
        spec: a PermutationSpec (default: discovered from the model at every commit).
    """

    commits_to_model = True  # rewrites the model after each experience (see compatibility)
    _snapshot: tuple[ExperienceSnapshot, int, int] | None = None  # for checkpoints that predate it

    def __init__(
        self,
        config: InterpolationConfig | None = None,
        *,
        spec: PermutationSpec | None = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        if config is not None and settings:
            raise TypeError(
                "WeightInterpolationPlugin: pass either config= or its fields as keywords, not both."
            )
        self.config = config if config is not None else InterpolationConfig(**settings)
        self.spec = spec
        self.reports: list[InterpolationReport] = []
        self._previous: dict[str, torch.Tensor] | None = None
        self._alphas: float | dict[str, float] = _fixed_alpha(self.config)
        self._experiences = 0
        self.held_out = HeldOutMemory()  # alpha="auto": samples of every experience, never trained on
        self._snapshot: tuple[ExperienceSnapshot, int, int] | None = None  # start, experiences, reports

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Checkpoints of release 0.1 kept the settings as attributes."""
        if "config" not in state:
            names = InterpolationConfig.setting_names()
            state["config"] = InterpolationConfig(**{k: state.pop(k) for k in names if k in state})
        state.setdefault("held_out", HeldOutMemory())
        self.__dict__.update(state)

    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        guard_experiences(strategy, self)

    def after_training(self, strategy: Any, **kwargs: Any) -> None:
        release_experiences(strategy)

    def before_train_dataset_adaptation(self, strategy: Any, **kwargs: Any) -> None:
        _check_composition(self, strategy)  # the first hook of an experience: before any work

    def after_train_dataset_adaptation(self, strategy: Any, **kwargs: Any) -> None:
        if self.config.alpha == "auto":  # before the data loaders are built from adapted_dataset
            self.held_out.truncate(self._experiences)  # an experience trained again after a rollback
            c = self.config
            self.held_out.withhold(strategy, c.holdout_samples, c.holdout_fraction, c.seed)

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        model = strategy.model
        check_finite(model_state(model), "the model", {n for n, _ in model.named_buffers()})
        with torch.random.fork_rng(devices=[]):  # reading a sample may draw (RandomRotation): not from yours
            _discover_spec(self, strategy, model)  # refuses an unsupported model before training
        c = self.config
        alpha = _fixed_alpha(c)
        self._alphas = tensor_alphas(model_state(model), alpha, c.layer_alpha, tensor_aliases(model))
        start = ExperienceSnapshot.take(model)
        self._snapshot = (start, self._experiences, len(self.reports))
        self._previous = start.state if self._experiences else None  # read only: shared with the snapshot
        if self._previous is not None and self.config.restart > 0:
            _restart(self, model, self._previous)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        try:
            self._commit(strategy)
        finally:  # the memories have stored the training part by now; an error rolls back anyway
            self.held_out.release(strategy)
        if self.config.alpha == "auto":
            self.held_out.keep(self.config.holdout_samples)

    def _commit(self, strategy: Any) -> None:
        self._experiences += 1
        if self._previous is None:
            return
        model, previous = strategy.model, self._previous
        spec = _discover_spec(self, strategy, model)  # again on the trained model, as the commit reads it
        self._previous = None
        data = _alignment_batches(self, strategy) if self._needs_data(model) else []
        new = _without_dropout(private_copy(model))
        perms, seconds = _permutations(self, strategy, previous, new, spec, data)
        frozen, identity, c = _frozen(model), identity_permutation(spec), self.config
        trained = model_state(model)

        def build(alphas: float | dict[str, float]) -> nn.Module:  # on a copy: the user's module is untouched
            committed = load_state_(new, interpolate_aligned(previous, trained, spec, perms, alphas, frozen))
            if c.bn_reestimate and data and not _at_an_end(alphas):
                reestimate_batchnorm(committed, [x for x, _ in data])
                load_state_(committed, {k: v for k, v in previous.items() if k in frozen})
            return committed

        search = None
        if c.alpha == "auto":
            aliases = tensor_aliases(model)

            def alphas_at(alpha: float) -> float | dict[str, float]:
                return tensor_alphas(trained, alpha, c.layer_alpha, aliases)

            search = _search_alpha(self, strategy, lambda alpha: build(alphas_at(alpha)))
            self._alphas = alphas_at(search.alpha)
        committed = build(self._alphas)
        load_state_(model, model_state(committed))  # the user's module changes only once it is complete
        _evaluate_the_commit(strategy)
        moved = sum(int((p.cpu() != identity[g]).sum()) for g, p in perms.items())
        self.reports.append(
            InterpolationReport(
                self._experiences - 1, c.alignment, _fixed_alpha(c) if search is None else search.alpha,
                moved, sum(spec.group_sizes.values()), seconds, sum(len(y) for _, y in data), search,
            )
        )  # fmt: skip

    def rollback(self, strategy: Any) -> None:
        """After an error inside the experience: the user's module and optimiser, the counter
        and the reports as the experience found them."""
        self.held_out.release(strategy)
        snapshot, self._snapshot, self._previous = self._snapshot, None, None
        if snapshot is not None:
            start, self._experiences, reports = snapshot
            start.restore()
            del self.reports[reports:]
        self.held_out.truncate(self._experiences)

    def commit(self) -> None:
        self._snapshot = None

    def _needs_data(self, model: nn.Module) -> bool:
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        return self.config.alignment in NEEDS_DATA or (self.config.bn_reestimate and has_bn)


def _fixed_alpha(config: InterpolationConfig) -> float:
    """α, or ½ where it is chosen at the commit (``"auto"``): the commit point the data-driven
    alignments (``sinkhorn_mid``) evaluate, since they run before α is chosen."""
    return 0.5 if config.alpha == "auto" else float(config.alpha)


def _search_alpha(
    plugin: WeightInterpolationPlugin, strategy: Any, build: Callable[[float], nn.Module]
) -> AlphaSearch:
    """``alpha="auto"``: the grid's best α (``build(α)``: its commit) on the held-out samples
    of every experience so far."""
    groups = plugin.held_out.batches(strategy.device, strategy.eval_mb_size or strategy.train_mb_size)
    return choose_alpha(plugin.config.alpha_grid, build, groups)


def _permutations(
    plugin: WeightInterpolationPlugin,
    strategy: Any,
    previous: dict[str, torch.Tensor],
    new: nn.Module,
    spec: PermutationSpec,
    data: list[tuple[Any, Any]],
) -> tuple[dict[str, torch.Tensor], float]:
    """The alignment of the trained network ``new`` to θ_old, and its seconds; groups that
    touch a frozen parameter stay the identity (a frozen tensor must not move)."""
    c = plugin.config
    old = _without_dropout(load_state_(private_copy(new), previous))
    perms, seconds = timed_alignment(
        old, new, spec, c.alignment, data=data, alpha=plugin._alphas, steps=c.align_steps, seed=c.seed,
        loss_fn=_loss(strategy),
    )  # fmt: skip
    identity, frozen = identity_permutation(spec), _frozen(new)
    return {g: identity[g] if g in spec.groups_touching(frozen) else p for g, p in perms.items()}, seconds


def _discover_spec(plugin: WeightInterpolationPlugin, strategy: Any, model: nn.Module) -> PermutationSpec:
    """The given spec, else the model's; plain averaging (``"none"``) needs none and falls
    back to the empty spec on a model discovery refuses."""
    if plugin.spec is not None:
        return plugin.spec
    try:
        return discover_spec(model, example_input_of(strategy, model))
    except ValueError:
        if plugin.config.alignment != "none":
            raise
        return PermutationSpec(group_sizes={}, axes={})


def _restart(plugin: WeightInterpolationPlugin, model: nn.Module, previous: dict[str, torch.Tensor]) -> None:
    """Move the model to ``(1 − r)·θ_old + r·θ_init`` before it trains (in place)."""
    fresh = fresh_initialisation(model, seed=restart_seed(plugin.config.seed, plugin._experiences))
    kept = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(fresh[n], p)]
    if kept:
        warnings.warn(
            f"WeightInterpolationPlugin(restart={plugin.config.restart}): {len(kept)} trainable parameter(s) "
            f"were not re-drawn (no reset_parameters() in their module, or a parametrization's originals "
            f"such as weight_norm's) and keep their previous values: {kept[:3]}",
            stacklevel=3,
        )
    load_state_(model, restart_state(previous, fresh, plugin.config.restart, _frozen(model)))





def _check_composition(plugin: WeightInterpolationPlugin, strategy: Any) -> None:
    """Refuse what would be silently wrong: a second commit, a plugin that resets the model or
    snapshots it before the commit (see :mod:`.plugin_compat`), or a buffer updated
    after this plugin read it."""
    if isinstance(strategy.model, MultiTaskModule):
        raise ValueError(
            "WeightInterpolationPlugin: multi-task models are not supported yet (task-aware alignment "
            "data and heads are unverified); use a single-head model."
        )
    if plugin._needs_data(strategy.model) and plugin.config.bn_reestimate and plugin.config.align_samples < 2:
        raise ValueError(
            "WeightInterpolationPlugin: BatchNorm statistics cannot be re-estimated on one sample; "
            "pass align_samples >= 2 or bn_reestimate=False."
        )
    plugins = list(strategy.plugins)
    check_interpolation_plugins(plugins, plugin)
    replays = [i for i, p in enumerate(plugins) if isinstance(p, ReplayPlugin)]
    at = plugins.index(plugin)
    if plugin.config.align_data in ("buffer", "both") and not replays and not isinstance(
        strategy, BUFFERED_TEMPLATES
    ):
        templates = ", ".join(t.__name__ for t in BUFFERED_TEMPLATES)
        raise ValueError(
            "WeightInterpolationPlugin(align_data='buffer') needs a replay memory: a ReplayPlugin in the "
            f"strategy, or a template that keeps one ({templates}); add one or pass align_data='experience'."
        )
    if any(i > at for i in replays):
        raise ValueError(
            "WeightInterpolationPlugin must come after ReplayPlugin in plugins=[...]: the buffer it aligns "
            "on is updated in ReplayPlugin.after_training_exp."
        )


def _alignment_batches(plugin: WeightInterpolationPlugin, strategy: Any) -> list[tuple[Any, Any]]:
    """Up to ``align_samples`` samples as ``(x, y)`` batches on the strategy's device."""
    sources = []
    if plugin.config.align_data in ("buffer", "both"):
        sources.append(_replay_memory(strategy))
    if plugin.config.align_data in ("experience", "both"):
        sources.append(strategy.experience.dataset)
    batches, left = [], plugin.config.align_samples
    generator = torch.Generator().manual_seed(1_000_003 * plugin.config.seed + plugin._experiences)
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


def _replay_memory(strategy: Any) -> Any:
    """The samples the strategy replays: its ``ReplayPlugin``'s buffer, else the template's own."""
    replay = next((p for p in strategy.plugins if isinstance(p, ReplayPlugin)), None)
    return (replay.storage_policy if replay is not None else strategy.storage_policy).buffer


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
        model: the network, as for any Avalanche strategy.
        optimizer: its optimiser.
        config: an :class:`InterpolationConfig`; or pass its fields as keywords.
        spec: see :class:`WeightInterpolationPlugin`.
        plugins: other Avalanche plugins (a ``ReplayPlugin`` for ``align_data="buffer"``).
        **base_kwargs: everything ``SupervisedTemplate`` accepts.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: InterpolationConfig | None = None,
        spec: PermutationSpec | None = None,
        plugins: Sequence[Any] | None = None,
        **base_kwargs: Any,
    ) -> None:
        names = InterpolationConfig.setting_names()
        settings = {k: base_kwargs.pop(k) for k in list(base_kwargs) if k in names}
        self.interpolation = WeightInterpolationPlugin(config, spec=spec, **settings)
        plugins = order_plugins(plugins or [], self.interpolation)
        super().__init__(model=model, optimizer=optimizer, plugins=plugins, **base_kwargs)

    def __getstate__(self) -> dict[str, Any]:  # Avalanche's save_checkpoint, between experiences
        if self.interpolation._previous is not None:
            raise RuntimeError("InterpolationStrategy cannot be checkpointed in the middle of an experience.")
        return optimizer_as_data(self.__dict__, self.model)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(optimizer_from_data(state, state["model"]))


declare_setting_keywords(InterpolationStrategy, vars(InterpolationConfig()))

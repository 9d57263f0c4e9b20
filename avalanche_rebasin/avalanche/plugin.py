"""RebasinPlugin: the Re-basin method as an Avalanche plugin, for any supervised template.

The first task trains as the strategy would without it. At every later one the plugin
puts a :class:`~avalanche_rebasin.continual.RebasinNetwork` in ``strategy.model`` (θ_i held
fixed; δ and the permutation logits its only parameters) and its optimiser in
``strategy.optimizer``, so periodic evaluation, early stopping, LR schedules, gradient
projections (GEM, A-GEM), distillation (LwF) and DDP all act on the network being
trained. At the task's end it commits ``θ_{i+1} = (1 − α)θ_i + απ_P̂(θ_i) + δ`` into the
user's module and hands ``strategy.model`` and ``strategy.optimizer`` back, before any
other plugin's ``after_training_exp`` (the plugin moves itself to the front of the list).

Every task is a transaction (:mod:`avalanche_rebasin.avalanche.transaction`): on any exception or
Ctrl-C inside it, the user's module and optimiser return to θ_i, ``strategy.model`` and
``strategy.optimizer`` to them, the plugin's counters and reports to the task's start, and the
error propagates; training the task again equals an uninterrupted run.

So: ``train()``'s returned metrics with ``eval_every > 0`` are those of the network being
trained (its last periodic evaluation); ``eval()`` after ``train()`` sees ``θ_{i+1}``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from avalanche.benchmarks.scenarios.online import OnlineCLExperience
from avalanche.distributed import DistributedHelper
from avalanche.evaluation.metric_results import MetricValue
from avalanche.models import MultiTaskModule
from avalanche.models.utils import avalanche_forward, is_multi_task_module
from avalanche.training.plugins import EvaluationPlugin, LRSchedulerPlugin, SupervisedPlugin
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Subset

from ..alignment.lmc import reestimate_batchnorm
from ..continual.config import RebasinConfig
from ..continual.rebasin import (
    ExperienceReport,
    RebasinNetwork,
    add_penalty_gradient,
    check_trainable,
    clip_delta_gradients,
    committed_state,
    experience_report,
    first_non_finite,
    make_optimizer,
    penalty_value,
)
from ..core.spec import PermutationSpec
from ..core.state import load_state_
from ..discovery import discover_spec
from .compatibility import check_plugins
from .inputs import example_input_of
from .transaction import ExperienceSnapshot, guard_experiences, release_experiences

__all__ = ["RebasinPlugin", "arrange_plugins"]

_CHECK_EVERY = 50  # steps between two host reads of the finiteness flag on an accelerator


class _MultiTaskRebasinNetwork(RebasinNetwork, MultiTaskModule):
    """The same network, seen by Avalanche as multi-task (``avalanche_forward`` passes task labels)."""


class RebasinPlugin(SupervisedPlugin, supports_distributed=True):  # type: ignore[call-arg]
    """Re-basin incremental learning (Guerrero Peña et al., CVPR 2023) for any template.

    Args:
        config: a :class:`RebasinConfig`; or give its fields as keyword arguments.
        spec: a PermutationSpec; by default discovered from the model at every task (so
            heads added by Avalanche's dynamic modules are included).
    """

    commits_to_model = True  # rewrites the model after each task (see plugin_compat)
    _snapshot: _TaskSnapshot | None = None  # class defaults: checkpoints pickled before they existed
    _task_done = False
    _finite: Tensor | None = None  # whether every loss of the task so far was finite (on the device)

    def __init__(
        self, config: RebasinConfig | None = None, *, spec: PermutationSpec | None = None, **settings: Any
    ):
        super().__init__()
        if config is not None and settings:
            raise TypeError("RebasinPlugin: pass either config= or its fields as keywords, not both.")
        self.config = config if config is not None else RebasinConfig.from_settings(**settings)
        self.spec = spec
        self.trained_tasks = 0
        self.reports: list[ExperienceReport] = []
        self.network: RebasinNetwork | None = None
        self._handover: _Handover | None = None
        self._subexps_seen = 0
        self._snapshot: _TaskSnapshot | None = None
        self._task_done = False
        self._finite: Tensor | None = None

    @property
    def active(self) -> bool:
        """True while a re-basin task is being trained."""
        return self.network is not None

    # -- hooks ------------------------------------------------------------------------------
    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        check_plugins(strategy.plugins)
        _check_single(strategy.plugins)
        strategy.plugins = arrange_plugins(strategy.plugins, self)
        guard_experiences(strategy, self)

    def after_training(self, strategy: Any, **kwargs: Any) -> None:
        release_experiences(strategy)

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        exp = strategy.experience
        if isinstance(exp, OnlineCLExperience):
            _check_online(exp, self.config)
        starts = not isinstance(exp, OnlineCLExperience) or exp.is_first_subexp
        if not starts and self._snapshot is None:
            raise ValueError(
                "RebasinPlugin: this sub-experience continues a task that was rolled back after an "
                "error; train the task again from its first sub-experience."
            )
        if starts:
            model = DistributedHelper.unwrap_model(strategy.model)
            check_trainable(model, f"RebasinPlugin: the model before task {self.trained_tasks}")
            self._snapshot = _TaskSnapshot(
                ExperienceSnapshot.take(model),
                self.trained_tasks,
                len(self.reports),
                self._subexps_seen,
            )
        if isinstance(exp, OnlineCLExperience):
            self._subexps_seen = 1 if exp.is_first_subexp else self._subexps_seen + 1

    def start_if_due(self, strategy: Any) -> None:
        """Called by :class:`_RebasinStarter` once every other plugin has prepared the experience:
        starts a re-basin task unless this is the first task or a later sub-experience of one."""
        if self.active or self.trained_tasks == 0:
            return
        model = DistributedHelper.unwrap_model(strategy.model)
        spec = self.spec or discover_spec(model, example_input_of(strategy, model))
        batches = max(len(strategy.dataloader), 1)
        epochs = _planned_epochs(self.config, strategy.train_epochs, batches)
        cls = _MultiTaskRebasinNetwork if isinstance(model, MultiTaskModule) else RebasinNetwork
        network = cls(model, spec, self.config, experience=self.trained_tasks, steps_total=epochs * batches)
        network.to(strategy.device)
        self._handover = _Handover.take(strategy, network, make_optimizer(network), epochs)
        self.network = network

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self.network is not None and self.config.beta:
            # the loss reports C_CL's value; its gradient 2βδ is added after the backward
            strategy.loss = strategy.loss + penalty_value(self.network)

    def after_backward(self, strategy: Any, **kwargs: Any) -> None:
        # this plugin runs first, so gradient projections (GEM, A-GEM) see the penalty's gradient
        # when it is clipped with the loss's; added after the clip, it acts as weight decay does
        if self.network is not None and not self.config.penalty_after_clip:
            add_penalty_gradient(self.network)

    def before_update(self, strategy: Any, **kwargs: Any) -> None:
        if self.network is not None:
            clip_delta_gradients(self.network)
            if self.config.penalty_after_clip:  # the authors' SGD weight decay, after their clip
                add_penalty_gradient(self.network)

    def after_update(self, strategy: Any, **kwargs: Any) -> None:
        if self.network is None:
            return
        self.network.steps_done += 1
        finite = torch.isfinite(strategy.loss.detach())  # on the device: no host sync here
        self._finite = finite if self._finite is None else self._finite & finite
        if self._finite.device.type == "cpu" or self.network.steps_done % _CHECK_EVERY == 0:
            self._check_finite(strategy)

    def _check_finite(self, strategy: Any) -> None:
        """Raise (and hand the strategy back) if a loss since the task began was not finite: a
        non-finite loss makes the next update's δ or logits non-finite, so this names them."""
        if self.network is None or self._finite is None or bool(self._finite):
            return
        label = first_non_finite(self.network) or "the loss"
        experience = self.network.experience
        self._give_back(strategy)
        raise ValueError(
            f"Re-basin: experience {experience} produced non-finite values in {label}; training "
            f"stopped and the model keeps θ_{experience}. Lower delta_lr/perm_lr or check the loss "
            "and data of this experience."
        )

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._task_done = _at_task_end(strategy.experience, self._subexps_seen)
        if not self._task_done:
            return
        self._check_finite(strategy)
        if self.network is not None:
            try:
                report = _commit(strategy, self.network)
            finally:
                self._give_back(strategy)
            self.reports.append(report)
            _publish(strategy, report)
        self.trained_tasks += 1

    def _give_back(self, strategy: Any) -> None:
        if self._handover is not None:
            self._handover.give_back(strategy)
        self.network, self._handover, self._finite = None, None, None

    # -- the task as a transaction (see avalanche_rebasin.avalanche.transaction) -------------------------
    def rollback(self, strategy: Any) -> None:
        """After an error inside the task: the strategy, the user's module and optimiser, the
        counters and the reports as the task found them."""
        snapshot, self._snapshot, self._task_done = self._snapshot, None, False
        self._give_back(strategy)
        if snapshot is None:
            return
        snapshot.start.restore()
        self.trained_tasks, self._subexps_seen = snapshot.trained_tasks, snapshot.subexps_seen
        del self.reports[snapshot.reports :]

    def commit(self) -> None:
        if self._task_done:
            self._snapshot, self._task_done = None, False


@dataclass
class _TaskSnapshot:
    """What a task's rollback restores."""

    start: ExperienceSnapshot
    trained_tasks: int
    reports: int
    subexps_seen: int


def _at_task_end(exp: Any, subexps_seen: int) -> bool:
    """True after an ordinary experience or the last sub-experience of an online task
    (counted too: Avalanche 0.6 flags none as last when the sizes divide exactly)."""
    if not isinstance(exp, OnlineCLExperience):
        return True
    return exp.is_last_subexp or subexps_seen == exp.sub_stream_length


def _check_online(exp: OnlineCLExperience, config: RebasinConfig) -> None:
    if not exp.access_task_boundaries:
        raise ValueError(
            "Re-basin commits once per task, so it needs the task boundaries of an online stream: "
            "build it with split_online_stream(..., access_task_boundaries=True)."
        )
    if config.tau_final is not None:
        raise ValueError("Re-basin: tau_final (τ annealing) is not supported on online streams.")


def _planned_epochs(config: RebasinConfig, train_epochs: int, batches: int) -> int:
    """``ceil(rebasin_steps / batches)``, else ``rebasin_epochs``, else the strategy's ``train_epochs``."""
    if config.rebasin_steps is not None:
        return math.ceil(config.rebasin_steps / batches)
    return config.rebasin_epochs or train_epochs


@dataclass
class _Handover:
    """What the plugin took from the strategy for one re-basin task, and how to give it back."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_epochs: int
    schedulers: list[tuple[Any, tuple]]

    @classmethod
    def take(
        cls, strategy: Any, network: RebasinNetwork, optimizer: torch.optim.Optimizer, epochs: int
    ) -> _Handover:
        """Put ``network`` (DDP-wrapped when distributed), ``optimizer`` and ``epochs`` in the
        strategy and point its LR schedulers at ``optimizer``."""
        schedulers = [
            (p.scheduler, _point_scheduler(p.scheduler, optimizer))
            for p in strategy.plugins
            if isinstance(p, LRSchedulerPlugin)
        ]
        handover = cls(strategy.model, strategy.optimizer, strategy.train_epochs, schedulers)
        strategy.model = DistributedHelper.wrap_model(network)
        strategy.optimizer, strategy.train_epochs = optimizer, epochs
        return handover

    def give_back(self, strategy: Any) -> None:
        strategy.model, strategy.optimizer, strategy.train_epochs = (
            self.model,
            self.optimizer,
            self.train_epochs,
        )
        for scheduler, saved in self.schedulers:
            scheduler.optimizer, scheduler.base_lrs, scheduler.last_epoch, scheduler._last_lr = saved


@torch.no_grad()
def _commit(strategy: Any, network: RebasinNetwork) -> ExperienceReport:
    """Write ``θ_{i+1}`` into the user's module, re-estimate BatchNorm, measure; on any error
    the module gets ``θ_i`` back."""
    model, config = network.base, network.config
    committed = committed_state(network)
    load_state_(model, committed)
    try:
        if config.bn_reestimate:
            reestimate_batchnorm(model, strategy.dataloader, forward=_forward_batch(strategy))
            _average_batchnorm_across_processes(model)
        report = experience_report(network)
        if config.diagnostic_samples:
            dataset = strategy.experience.dataset
            n = min(len(dataset), config.diagnostic_samples)
            loader = DataLoader(Subset(dataset, range(n)), batch_size=strategy.eval_mb_size or 256)
            batches = [[t.to(strategy.device) for t in batch] for batch in loader]
            report.acc_trained = _accuracy(model, network.trained_state(), batches)
            report.acc_rounded = _accuracy(model, network.trained_state(network.hard_permutations()), batches)
            report.acc_committed = _accuracy(model, committed, batches)
    except BaseException:
        load_state_(model, network.theta_state())  # the model keeps θ_i
        raise
    return report


class _RebasinStarter(SupervisedPlugin, supports_distributed=True):  # type: ignore[call-arg]
    """Starts a re-basin task after the other plugins' ``before_training_exp`` (replay loaders
    and the like are in place, so the step count is the one trained)."""

    def __init__(self, owner: RebasinPlugin) -> None:
        super().__init__()
        self.owner = owner

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.owner.start_if_due(strategy)


def arrange_plugins(plugins: list[Any], rebasin: RebasinPlugin) -> list[Any]:
    """A new list: ``rebasin`` first (its commit precedes every other ``after_training_exp``)
    and its starter just before the evaluator (after every other ``before_training_exp``)."""
    others = [p for p in plugins if p is not rebasin and not isinstance(p, _RebasinStarter)]
    starter = next((p for p in plugins if isinstance(p, _RebasinStarter) and p.owner is rebasin), None)
    starter = starter or _RebasinStarter(rebasin)
    at = next((i for i, p in enumerate(others) if isinstance(p, EvaluationPlugin)), len(others))
    return [rebasin, *others[:at], starter, *others[at:]]


def _point_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer) -> tuple:
    """Point ``scheduler`` at ``optimizer`` from its groups' lrs; return what to restore."""
    saved = (scheduler.optimizer, list(scheduler.base_lrs), scheduler.last_epoch, list(scheduler._last_lr))
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    scheduler.optimizer = optimizer
    scheduler.base_lrs = [group["lr"] for group in optimizer.param_groups]
    scheduler.last_epoch = 0
    scheduler._last_lr = list(scheduler.base_lrs)
    _track_step_called(optimizer)
    return saved


def _track_step_called(optimizer: torch.optim.Optimizer) -> None:
    """What torch's LR scheduler does to the optimiser it is built on: mark ``_opt_called``
    when ``step`` runs, so its order check ("lr_scheduler.step() before optimizer.step()")
    sees the steps of the re-basin optimiser it was pointed at instead of warning."""
    if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        return
    step = optimizer.step

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        optimizer._opt_called = True  # type: ignore[attr-defined]
        return step(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = wrapper  # type: ignore[method-assign]


def _forward_batch(strategy: Any):
    def forward(model: nn.Module, batch: Any) -> Any:
        task = batch[2].to(strategy.device) if len(batch) > 2 else None
        return avalanche_forward(model, batch[0].to(strategy.device), task)

    return forward


def _average_batchnorm_across_processes(model: nn.Module) -> None:
    """Under DDP each process re-estimated on its own shard: use the mean of the processes'."""
    if not DistributedHelper.is_distributed:
        return
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            assert m.running_var is not None  # tracked together with the mean
            for stat in (m.running_mean, m.running_var):
                torch.distributed.all_reduce(stat)
                stat /= DistributedHelper.world_size


def _accuracy(model: nn.Module, state: dict[str, Tensor], batches: list[list[Tensor]]) -> float:
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for batch in batches:
            args = (batch[0], batch[2]) if is_multi_task_module(model) else (batch[0],)
            out = functional_call(model, {k: v.clone() for k, v in state.items()}, args)
            correct += int((out.argmax(-1) == batch[1]).sum())
            total += len(batch[1])
    finally:
        model.train(was_training)
    return correct / max(total, 1)


def _publish(strategy: Any, report: ExperienceReport) -> None:
    """The report as Avalanche metrics ``Rebasin/<name>/train_phase/train_stream``, one point
    per committed experience (x = its index), for every logger."""
    evaluator = getattr(strategy, "evaluator", None)
    if evaluator is None:
        return
    skip = {"experience", "units_total", "extra"}
    values = {k: v for k, v in vars(report).items() if k not in skip and v is not None}
    values.update({f"extra/{k}": v for k, v in report.extra.items()})
    for name, value in values.items():
        metric = f"Rebasin/{name}/train_phase/train_stream"
        evaluator.publish_metric_value(MetricValue(evaluator, metric, value, report.experience))


def _check_single(plugins: list[Any]) -> None:
    if sum(isinstance(p, RebasinPlugin) for p in plugins) > 1:
        raise ValueError(
            "A strategy can carry one RebasinPlugin (RebasinStrategy already has its own); "
            "remove the extra one and pass its settings to the first."
        )

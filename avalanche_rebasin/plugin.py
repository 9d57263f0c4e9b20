"""RebasinPlugin: the Re-basin method as an Avalanche plugin, for any supervised template.

The first task trains as the strategy would without it. At every later one the plugin
puts a :class:`~avalanche_rebasin.continual.RebasinNetwork` in ``strategy.model`` (θ_i held
fixed; δ and the permutation logits its only parameters) and its optimiser in
``strategy.optimizer``, so periodic evaluation, early stopping, LR schedules, gradient
projections (GEM, A-GEM), distillation (LwF) and DDP all act on the network being
trained. At the task's end it commits ``θ_{i+1} = (1 − α)θ_i + απ_P̂(θ_i) + δ`` into the
user's module and hands ``strategy.model`` and ``strategy.optimizer`` back, before any
other plugin's ``after_training_exp`` (the plugin moves itself to the front of the list).

So: ``train()``'s returned metrics with ``eval_every > 0`` are those of the network being
trained (its last periodic evaluation); ``eval()`` after ``train()`` sees ``θ_{i+1}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from avalanche.benchmarks.scenarios.online import OnlineCLExperience
from avalanche.distributed import DistributedHelper
from avalanche.evaluation.metric_results import MetricValue
from avalanche.models import MultiTaskModule
from avalanche.models.dynamic_modules import MultiHeadClassifier
from avalanche.models.utils import avalanche_forward
from avalanche.training.plugins import EvaluationPlugin, LRSchedulerPlugin, SupervisedPlugin
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Subset

from .continual import ExperienceReport, RebasinNetwork
from .continual_config import RebasinConfig
from .lmc import reestimate_batchnorm
from .permute import load_state_
from .plugin_compat import check_plugins
from .spec import PermutationSpec

__all__ = ["RebasinPlugin", "arrange_plugins"]


class _MultiTaskRebasinNetwork(RebasinNetwork, MultiTaskModule):
    """The same network, seen by Avalanche as multi-task (``avalanche_forward`` passes task labels)."""


@dataclass
class _Handed:
    """What the plugin took from the strategy for one re-basin task, to give back."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_epochs: int
    schedulers: list[tuple[Any, tuple]]


class RebasinPlugin(SupervisedPlugin, supports_distributed=True):
    """Re-basin incremental learning (Guerrero Peña et al., CVPR 2023) for any template.

    Args:
        config: a :class:`RebasinConfig`; or give its fields as keyword arguments.
        spec: a PermutationSpec; by default discovered from the model at every task (so
            heads added by Avalanche's dynamic modules are included).
    """

    def __init__(
        self, config: RebasinConfig | None = None, *, spec: PermutationSpec | None = None, **settings: Any
    ):
        super().__init__()
        if config is not None and settings:
            raise TypeError("RebasinPlugin: pass either config= or its fields as keywords, not both.")
        self.config = config if config is not None else RebasinConfig(**settings)
        self.spec = spec
        self.trained_tasks = 0
        self.reports: list[ExperienceReport] = []
        self.network: RebasinNetwork | None = None
        self._handed: _Handed | None = None
        self._subexps_seen = 0

    @property
    def active(self) -> bool:
        """True while a re-basin task is being trained."""
        return self.network is not None

    # -- hooks ------------------------------------------------------------------------------
    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        check_plugins(strategy.plugins)
        strategy.plugins = arrange_plugins(strategy.plugins, self)

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        exp = strategy.experience
        if isinstance(exp, OnlineCLExperience) and not exp.access_task_boundaries:
            raise ValueError(
                "Re-basin commits once per task, so it needs the task boundaries of an online stream: "
                "build it with split_online_stream(..., access_task_boundaries=True)."
            )
        if isinstance(exp, OnlineCLExperience):
            if self.config.tau_final is not None:
                raise ValueError("Re-basin: tau_final (τ annealing) is not supported on online streams.")
            self._subexps_seen = 1 if exp.is_first_subexp else self._subexps_seen + 1

    def start_if_due(self, strategy: Any) -> None:
        """Called by :class:`_RebasinStarter` once every other plugin has prepared the experience."""
        if not (self.active or self.trained_tasks == 0):  # not the first task, nor a later sub-experience
            self._start(strategy)

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self.active and self.config.beta:
            penalty = self.network.delta_penalty()
            # Under DDP a δ the forward did not use (another task's head) is already marked
            # ready; the penalty's gradient 2βδ is then added in before_update instead.
            distributed = DistributedHelper.is_distributed
            strategy.loss = strategy.loss + (penalty.detach() if distributed else penalty)

    def before_update(self, strategy: Any, **kwargs: Any) -> None:
        if not self.active:
            return
        if self.config.beta and DistributedHelper.is_distributed:
            with torch.no_grad():
                for d in self.network.delta.values():
                    g = 2 * self.config.beta * d
                    d.grad = g if d.grad is None else d.grad.add_(g)
        self.network.clip_delta_gradients()

    def after_update(self, strategy: Any, **kwargs: Any) -> None:
        if not self.active:
            return
        self.network.steps_done += 1
        label = self.network.non_finite()
        if label is not None:
            experience = self.network.experience
            self._give_back(strategy)
            raise ValueError(
                f"Re-basin: experience {experience} produced non-finite values in {label}; training "
                f"stopped and the model keeps θ_{experience}. Lower delta_lr/perm_lr or check the loss "
                "and data of this experience."
            )

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if not self._at_task_end(strategy.experience):
            return
        if self.active:
            try:
                self._commit(strategy)
            finally:
                self._give_back(strategy)
        self.trained_tasks += 1

    def _at_task_end(self, exp: Any) -> bool:
        """True after an ordinary experience or the last sub-experience of an online task
        (counted too: Avalanche 0.6 flags none as last when the sizes divide exactly)."""
        if not isinstance(exp, OnlineCLExperience):
            return True
        return exp.is_last_subexp or self._subexps_seen == exp.sub_stream_length

    # -- start and hand-back ------------------------------------------------------------------
    def _start(self, strategy: Any) -> None:
        model = DistributedHelper.unwrap_model(strategy.model)
        spec = self.spec or PermutationSpec.from_model(model, _example_input(strategy, model))
        batches = max(len(strategy.dataloader), 1)
        c = self.config
        if c.rebasin_steps is not None:
            epochs = math.ceil(c.rebasin_steps / batches)
        else:
            epochs = c.rebasin_epochs or strategy.train_epochs
        cls = _MultiTaskRebasinNetwork if isinstance(model, MultiTaskModule) else RebasinNetwork
        network = cls(model, spec, c, experience=self.trained_tasks, steps_total=epochs * batches)
        network.to(strategy.device)
        optimizer = network.make_optimizer()
        self._handed = _Handed(strategy.model, strategy.optimizer, strategy.train_epochs, [])
        for plugin in strategy.plugins:
            if isinstance(plugin, LRSchedulerPlugin):
                self._handed.schedulers.append(
                    (plugin.scheduler, _point_scheduler(plugin.scheduler, optimizer))
                )
        self.network = network
        strategy.model = DistributedHelper.wrap_model(network)
        strategy.optimizer = optimizer
        strategy.train_epochs = epochs

    def _give_back(self, strategy: Any) -> None:
        handed = self._handed
        self.network, self._handed = None, None
        if handed is None:
            return
        strategy.model, strategy.optimizer, strategy.train_epochs = (
            handed.model,
            handed.optimizer,
            handed.train_epochs,
        )
        for scheduler, saved in handed.schedulers:
            scheduler.optimizer, scheduler.base_lrs, scheduler.last_epoch, scheduler._last_lr = saved

    # -- the commit ----------------------------------------------------------------------------
    @torch.no_grad()
    def _commit(self, strategy: Any) -> None:
        network = self.network
        model = network.base
        committed = network.committed_state()
        load_state_(model, committed)
        try:
            if self.config.bn_reestimate:
                reestimate_batchnorm(model, strategy.dataloader, forward=_forward_batch(strategy))
                _average_batchnorm_across_processes(model)
            report = network.report()
            if self.config.diagnostic_samples:
                self._measure_accuracies(strategy, network, report, committed)
        except BaseException:
            load_state_(model, network.theta_state())  # the model keeps θ_i
            raise
        self.reports.append(report)
        _publish(strategy, report)

    def _measure_accuracies(
        self, strategy: Any, network: RebasinNetwork, report: ExperienceReport, committed: dict[str, Tensor]
    ) -> None:
        dataset = strategy.experience.dataset
        n = min(len(dataset), self.config.diagnostic_samples)
        loader = DataLoader(Subset(dataset, range(n)), batch_size=strategy.eval_mb_size or 256)
        batches = [[t.to(strategy.device) for t in batch] for batch in loader]
        report.acc_trained = _accuracy(network.base, network.trained_state(), batches)
        report.acc_rounded = _accuracy(
            network.base, network.trained_state(network.hard_permutations()), batches
        )
        report.acc_committed = _accuracy(network.base, committed, batches)


class _RebasinStarter(SupervisedPlugin, supports_distributed=True):
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
    return saved


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
            for stat in (m.running_mean, m.running_var):
                torch.distributed.all_reduce(stat)
                stat /= DistributedHelper.world_size


def _accuracy(model: nn.Module, state: dict[str, Tensor], batches: list[list[Tensor]]) -> float:
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for batch in batches:
            args = (batch[0], batch[2]) if isinstance(model, MultiTaskModule) else (batch[0],)
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


def _example_input(strategy: Any, model: nn.Module) -> Any:
    """One sample of the experience, with every task label the model knows if multi-task."""
    x = strategy.experience.dataset[0][0].unsqueeze(0).to(strategy.device)
    if not isinstance(model, MultiTaskModule):
        return x
    tasks = sorted(
        {int(t) for m in model.modules() if isinstance(m, MultiHeadClassifier) for t in m.classifiers}
        | set(strategy.experience.task_labels)
    )
    return (x.repeat(len(tasks), *([1] * (x.dim() - 1))), torch.tensor(tasks, device=strategy.device))

"""RebasinStrategy: incremental learning by re-basin (Guerrero Peña et al., CVPR 2023, §4.3).

The only module of the package that imports Avalanche. The first experience is
trained normally with the user's optimiser. At every later experience ``i`` the
weights ``θ_i`` are frozen, and a residual ``δ`` and Sinkhorn permutation logits
``X`` are optimised jointly on

    C_CL(δ, P; θ_i) = C((θ_i + π_P(θ_i)) / 2 + δ) + β‖δ‖²,   P = Sinkhorn(X / τ),

over the experience's minibatches (plus whatever replay plugins add). At the end of
the experience the hard permutation ``P̂`` (linear assignment on ``X``) is committed:

    θ_{i+1} = (1 − α) θ_i + α π_P̂(θ_i) + δ

before the evaluator runs. BatchNorm running statistics are then re-estimated for
``θ_{i+1}`` on the experience's training batches (replay included): statistics carried
over from ``θ_i`` would not match the new weights (other buffers follow the formula
without ``δ``). ``permute=False`` fixes ``P`` to the identity: the δ-only ablation.

The published protocol trains the midpoint (weight ½) with the soft plan but commits
weight α with the hard one. Options close that gap: ``train_alpha`` (the weight of
``π_P(θ)`` during training; set it to α to train what is committed),
``straight_through`` (the forward uses ``P̂`` of the current logits, the backward the
soft plan's gradient) and ``tau_final`` (τ annealed geometrically towards a hard plan
over the experience). ``delta_optimizer`` and ``rebasin_steps`` give δ and ``X`` a budget
that does not depend on the data set's size. Named settings live in :data:`PRESETS`;
:meth:`RebasinStrategy.from_preset` builds one.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from avalanche.models import MultiTaskModule
from avalanche.models.dynamic_modules import MultiHeadClassifier
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader

from .align import PermutationLogits
from .lmc import reestimate_batchnorm
from .matching import similarity_matrix
from .permute import identity_permutation, load_state_, model_state, permute_state, soft_permute_state
from .sinkhorn import permutation_matrix
from .spec import PermutationSpec

__all__ = ["PRESETS", "ExperienceReport", "RebasinStrategy"]

#: Named settings for :meth:`RebasinStrategy.from_preset` (keyword arguments of the constructor).
#: ``paper``: the authors' Rotated-MNIST protocol, the constructor's defaults.
#: ``midpoint``: the paper's training (soft plan, midpoint ``(θ + π_P(θ))/2 + δ``) with δ
#: given an Adam budget (lr 1e-3, no clip) that does not starve on small data sets.
#: ``consistent``: the same δ budget, and trains what is committed — weight α = 0.2 on
#: ``π(θ)`` in training too, the hard permutation in the forward (straight-through).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "midpoint": {"delta_optimizer": "adam", "delta_lr": 1e-3, "delta_clip": None},
    "consistent": {
        "train_alpha": 0.2,
        "straight_through": True,
        "delta_optimizer": "adam",
        "delta_lr": 1e-3,
        "delta_clip": None,
    },
}


@dataclass
class ExperienceReport:
    """Diagnostics of one committed experience (see ``RebasinStrategy.reports``).

    ``mean_row_max``: mean over rows of the soft plan's largest entry (1.0 for a
    permutation, ``1/n`` for the uniform plan), averaged over groups.
    ``units_moved``: how many units the hard permutation moves, over all groups.
    ``acc_trained``: accuracy of the model that was trained, ``(1−a)θ + aπ_P(θ) + δ``
    with the training plans (``a = train_alpha``); ``acc_rounded``: the same with the
    hard permutation;
    ``acc_committed``: of ``θ_{i+1}``; all on up to ``diagnostic_samples`` samples of
    the experience's own training data.
    """

    experience: int
    mean_row_max: float
    units_moved: int
    units_total: int
    acc_trained: float
    acc_rounded: float
    acc_committed: float
    delta_norm: float
    extra: dict[str, float] = field(default_factory=dict)


class _JointOptimizer:
    """Several optimisers stepped as one (duck-types the parts of Optimizer Avalanche uses)."""

    def __init__(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def state_dict(self) -> list[dict]:
        return [opt.state_dict() for opt in self.optimizers]

    def load_state_dict(self, states: list[dict]) -> None:
        for opt, state in zip(self.optimizers, states):
            opt.load_state_dict(state)


@dataclass
class _OptimizerSnapshot:
    """A torch optimiser as plain data (class path, settings, state, parameter names).

    dill 0.4 pickles torch's optimiser classes by value and fails (their modules are
    not attributes of ``torch.optim``), which breaks Avalanche's ``save_checkpoint``
    for every strategy; the strategy pickles its optimiser through this snapshot.
    """

    class_path: str
    groups: list[dict[str, Any]]
    state: dict[str, Any]

    @classmethod
    def take(cls, optimizer: torch.optim.Optimizer, model: nn.Module) -> _OptimizerSnapshot:
        names = {id(p): n for n, p in model.named_parameters()}
        groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
            for g in optimizer.param_groups
        ]
        path = f"{type(optimizer).__module__}:{type(optimizer).__qualname__}"
        return cls(path, groups, optimizer.state_dict())

    def restore(self, model: nn.Module) -> torch.optim.Optimizer:
        module, _, name = self.class_path.partition(":")
        optimizer_cls = getattr(importlib.import_module(module), name)
        params = dict(model.named_parameters())
        groups = [{**g, "params": [params[n] for n in g["params"]]} for g in self.groups]
        optimizer = optimizer_cls(groups)
        optimizer.load_state_dict(self.state)
        return optimizer


@dataclass
class _ExperienceState:
    """What one re-basin experience optimises; discarded after the commit."""

    experience: int
    spec: PermutationSpec
    theta: dict[str, Tensor]
    delta: dict[str, nn.Parameter]
    logits: PermutationLogits | None
    optimizer: _JointOptimizer
    steps_done: int = 0
    steps_total: int = 1


class RebasinStrategy(SupervisedTemplate):
    """Avalanche strategy that learns each new experience as a re-basin of the last.

    Defaults follow the authors' Rotated-MNIST protocol (preset ``paper``): α = 0.2,
    τ = 1, 20 Sinkhorn iterations, logits initialised at ``I + 0.1·N(0, 1)`` and trained
    with Adam at lr 0.1, δ initialised at ``1e-4·N(0, 1)`` and trained with SGD at
    lr 0.05 with gradients clipped to ±0.001, 5 epochs per experience, the midpoint
    ``(θ + π_P(θ))/2 + δ`` trained with the soft plan. The published weight decay 0.1
    on δ is the penalty ``β‖δ‖²`` with β = 0.05 (same gradient, ``2βδ = 0.1δ``).

    Args:
        model, optimizer: the network and the optimiser for the first experience.
        alpha: share of the permuted weights in the commit, in [0, 1].
        train_alpha: share of ``π_P(θ)`` in the model trained at each step,
            ``(1 − a)θ + aπ_P(θ) + δ``, in [0, 1] (paper: 0.5; None: same as ``alpha``).
        beta: weight of ``‖δ‖²`` in ``C_CL``, ≥ 0.
        tau, sinkhorn_iters: Sinkhorn temperature (> 0) and iterations.
        tau_final: if set (> 0), τ is annealed geometrically from ``tau`` to ``tau_final``
            over each experience's optimisation steps.
        straight_through: forward with the hard permutation ``P̂`` of the current logits,
            backward through the soft plan (``P̂ + P − stop_grad(P)``).
        perm_lr, perm_init_noise: Adam lr of the logits; std of their initial noise.
        perm_init: ``"identity"`` (paper: ``X = I + noise``) or ``"similarity"``
            (``X = C + noise`` with ``C_ij`` the cosine similarity of units ``i`` and ``j``
            of ``θ_i``, all tensors of the group concatenated: the soft plan starts by
            mixing units the model already treats alike; ``C_ii = 1``).
        delta_optimizer: ``"sgd"`` (paper) or ``"adam"`` for δ.
        delta_lr, delta_clip, delta_init_std: lr of δ (0 freezes it), its gradient
            clip (None: no clip), its initial std.
        rebasin_epochs: epochs per experience after the first (``train_epochs`` is
            used for the first).
        rebasin_steps: if set, overrides ``rebasin_epochs`` with as many epochs as it
            takes to make at least this many optimiser steps, whatever the data size.
        permute: False fixes the permutation to the identity (δ-only ablation).
        bn_reestimate: re-estimate BatchNorm running statistics of the committed model
            on the experience's training batches (one pass, cumulative average);
            False commits ``(1 − α)·stats_i + α·π(stats_i)``.
        spec: a PermutationSpec; by default discovered from the model at every
            experience (so heads added by Avalanche's dynamic modules are included).
        seed: seeds the initial δ and logits of every experience.
        diagnostic_samples: samples of each experience used for the reports.
        **base_kwargs: everything ``SupervisedTemplate`` accepts (criterion,
            train_mb_size, train_epochs, eval_mb_size, device, plugins, evaluator, …).
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        alpha: float = 0.2,
        train_alpha: float | None = 0.5,
        beta: float = 0.05,
        tau: float = 1.0,
        tau_final: float | None = None,
        sinkhorn_iters: int = 20,
        straight_through: bool = False,
        perm_lr: float = 0.1,
        perm_init_noise: float = 0.1,
        perm_init: Literal["identity", "similarity"] = "identity",
        delta_optimizer: Literal["sgd", "adam"] = "sgd",
        delta_lr: float = 0.05,
        delta_clip: float | None = 1e-3,
        delta_init_std: float = 1e-4,
        rebasin_epochs: int = 5,
        rebasin_steps: int | None = None,
        permute: bool = True,
        bn_reestimate: bool = True,
        spec: PermutationSpec | None = None,
        seed: int = 0,
        diagnostic_samples: int = 1000,
        **base_kwargs: Any,
    ) -> None:
        train_alpha = alpha if train_alpha is None else train_alpha
        _check_hyperparameters(
            alpha=alpha,
            train_alpha=train_alpha,
            beta=beta,
            tau=tau,
            tau_final=tau_final,
            sinkhorn_iters=sinkhorn_iters,
            perm_lr=perm_lr,
            delta_optimizer=delta_optimizer,
            delta_lr=delta_lr,
            delta_clip=delta_clip,
            rebasin_epochs=rebasin_epochs,
            rebasin_steps=rebasin_steps,
            perm_init_noise=perm_init_noise,
            perm_init=perm_init,
            delta_init_std=delta_init_std,
            train_epochs=base_kwargs.get("train_epochs", 1),
        )
        super().__init__(model=model, optimizer=optimizer, **base_kwargs)
        self.alpha, self.beta, self.tau = float(alpha), float(beta), float(tau)
        self.train_alpha = float(train_alpha)
        self.tau_final = None if tau_final is None else float(tau_final)
        self.sinkhorn_iters = int(sinkhorn_iters)
        self.straight_through = bool(straight_through)
        self.perm_lr, self.perm_init_noise = float(perm_lr), float(perm_init_noise)
        self.perm_init = perm_init
        self.delta_optimizer = delta_optimizer
        self.delta_lr, self.delta_clip = float(delta_lr), delta_clip
        self.delta_init_std = float(delta_init_std)
        self.rebasin_epochs = int(rebasin_epochs)
        self.rebasin_steps = None if rebasin_steps is None else int(rebasin_steps)
        self.use_permutation = bool(permute)
        self.bn_reestimate = bool(bn_reestimate)
        self.fixed_spec = spec
        self.seed = int(seed)
        self.diagnostic_samples = int(diagnostic_samples)
        self.base_optimizer = optimizer
        self.trained_experiences = 0
        self.reports: list[ExperienceReport] = []
        self._rebasin: _ExperienceState | None = None

    @classmethod
    def from_preset(
        cls, name: str, *, model: nn.Module, optimizer: torch.optim.Optimizer, **kwargs: Any
    ) -> RebasinStrategy:
        """Build with the settings of ``PRESETS[name]``; ``kwargs`` override them and pass
        everything else (``train_mb_size``, ``plugins``, …) to the constructor."""
        if name not in PRESETS:
            raise ValueError(f"RebasinStrategy: unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls(model=model, optimizer=optimizer, **{**PRESETS[name], **kwargs})

    # -- checkpointing ---------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._rebasin is not None:
            raise RuntimeError("RebasinStrategy cannot be checkpointed in the middle of an experience.")
        shared = self.optimizer is self.base_optimizer
        state["base_optimizer"] = _OptimizerSnapshot.take(self.base_optimizer, self.model)
        state["optimizer"] = "base" if shared else _OptimizerSnapshot.take(self.optimizer, self.model)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if isinstance(self.base_optimizer, _OptimizerSnapshot):
            self.base_optimizer = self.base_optimizer.restore(self.model)
        if isinstance(self.optimizer, _OptimizerSnapshot):
            self.optimizer = self.optimizer.restore(self.model)
        elif self.optimizer == "base":
            self.optimizer = self.base_optimizer

    # -- phases --------------------------------------------------------------------------
    @property
    def rebasin_active(self) -> bool:
        """True while an experience after the first is being trained."""
        return self._rebasin is not None

    def make_optimizer(self, **kwargs: Any) -> None:
        """First experience: the user's optimiser. Later ones: δ and logits (idempotent)."""
        if self.trained_experiences == 0:
            self.optimizer = self.base_optimizer
            super().make_optimizer(**kwargs)
            return
        if self._rebasin is None or self._rebasin.experience != self.trained_experiences:
            self._rebasin = self._start_experience()
        self.optimizer = self._rebasin.optimizer

    def _train_exp(self, experience, eval_streams=None, **kwargs):
        if not self.rebasin_active:
            return super()._train_exp(experience, eval_streams, **kwargs)
        epochs = self.train_epochs
        batches = max(len(self.dataloader), 1)
        if self.rebasin_steps is None:
            self.train_epochs = self.rebasin_epochs
        else:
            self.train_epochs = math.ceil(self.rebasin_steps / batches)
        self._rebasin.steps_total = self.train_epochs * batches
        try:
            return super()._train_exp(experience, eval_streams, **kwargs)
        finally:
            self.train_epochs = epochs

    def _example_input(self) -> Any:
        x = self.experience.dataset[0][0].unsqueeze(0).to(self.device)
        if not isinstance(self.model, MultiTaskModule):
            return x
        tasks = sorted(
            {
                int(t)
                for m in self.model.modules()
                if isinstance(m, MultiHeadClassifier)
                for t in m.classifiers
            }
            | set(self.experience.task_labels)
        )
        return (x.repeat(len(tasks), *([1] * (x.dim() - 1))), torch.tensor(tasks, device=self.device))

    def _start_experience(self) -> _ExperienceState:
        index = self.trained_experiences
        spec = self.fixed_spec or PermutationSpec.from_model(self.model, self._example_input())
        theta = {k: v.detach().clone() for k, v in model_state(self.model).items()}
        spec.validate(theta)
        generator = torch.Generator().manual_seed(self.seed * 100_003 + index)
        delta = {
            name: nn.Parameter(self.delta_init_std * torch.randn(p.shape, generator=generator).to(p))
            for name, p in self.model.named_parameters()
        }
        delta_cls = torch.optim.Adam if self.delta_optimizer == "adam" else torch.optim.SGD
        optimizers: list[torch.optim.Optimizer] = [delta_cls(delta.values(), lr=self.delta_lr)]
        logits = None
        if self.use_permutation and len(spec):
            init = {
                g: self._initial_logits(spec, theta, g, n)
                + self.perm_init_noise * torch.randn(n, n, generator=generator)
                for g, n in spec.group_sizes.items()
            }
            logits = PermutationLogits(spec, init).to(self.device)
            optimizers.insert(0, torch.optim.Adam(logits.parameters(), lr=self.perm_lr))
        return _ExperienceState(index, spec, theta, delta, logits, _JointOptimizer(optimizers))

    def _initial_logits(self, spec: PermutationSpec, theta: dict[str, Tensor], group: str, n: int) -> Tensor:
        if self.perm_init == "identity":
            return torch.eye(n)
        parameters = {name for name, _ in self.model.named_parameters()}
        keys = [k for k in spec.axes if k in parameters]
        identity = identity_permutation(spec, device=self.device)
        gram = similarity_matrix(theta, theta, spec, identity, group, keys)
        norms = gram.diagonal().clamp_min(1e-12).sqrt()
        return (gram / norms[:, None] / norms[None, :]).float().cpu()

    # -- the training step ---------------------------------------------------------------------
    @property
    def current_tau(self) -> float:
        """τ at the current step: ``tau · (tau_final / tau)^(t / (T − 1))`` when annealed."""
        st = self._rebasin
        if self.tau_final is None or st is None:
            return self.tau
        progress = min(st.steps_done / max(st.steps_total - 1, 1), 1.0)
        return self.tau * (self.tau_final / self.tau) ** progress

    def _plans(self, st: _ExperienceState) -> dict[str, Tensor]:
        """The plans used in training: soft, or hard forward with soft gradient."""
        assert st.logits is not None
        plans = st.logits.plans(self.current_tau, self.sinkhorn_iters)
        if not self.straight_through:
            return plans
        hard = st.logits.hard()
        return {g: permutation_matrix(hard[g], p.dtype) + p - p.detach() for g, p in plans.items()}

    def _merged_state(self, hard: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """``(1 − a)θ + aπ(θ) + δ`` (``a = train_alpha``) with the training plans, or the
        hard permutation when given."""
        st = self._rebasin
        assert st is not None
        if hard is not None:
            permuted = permute_state(st.theta, st.spec, hard)
        elif st.logits is not None:
            permuted = soft_permute_state(st.theta, st.spec, self._plans(st))
        else:
            permuted = st.theta
        a = self.train_alpha
        merged = {}
        for name, value in st.theta.items():
            if not value.is_floating_point():
                merged[name] = value.clone()  # BatchNorm counters are updated in place
            elif name in st.delta:  # a parameter
                merged[name] = (1 - a) * value + a * permuted[name] + st.delta[name]
            else:  # a buffer (running statistics): not differentiated
                merged[name] = ((1 - a) * value + a * permuted[name]).detach()
        return merged

    def _call(self, state: dict[str, Tensor], x: Tensor, task_labels: Tensor | None) -> Tensor:
        args = (x, task_labels) if isinstance(self.model, MultiTaskModule) else (x,)
        return functional_call(self.model, state, args)

    def forward(self):
        if self.is_training and self.rebasin_active:
            task = self.mb_task_id if isinstance(self.model, MultiTaskModule) else None
            return self._call(self._merged_state(), self.mb_x, task)
        return super().forward()

    def criterion(self):
        loss = super().criterion()
        if self.is_training and self.rebasin_active and self.beta:
            loss = loss + self.beta * sum((d**2).sum() for d in self._rebasin.delta.values())
        return loss

    def optimizer_step(self) -> None:
        if not self.rebasin_active:
            return super().optimizer_step()
        st = self._rebasin
        if self.delta_clip is not None:
            torch.nn.utils.clip_grad_value_(list(st.delta.values()), self.delta_clip)
        super().optimizer_step()
        st.steps_done += 1
        tensors = {f"δ of '{k}'": v for k, v in st.delta.items()}
        if st.logits is not None:
            tensors.update(
                {f"permutation logits of group '{g}'": x for g, x in zip(st.logits.names, st.logits.logits)}
            )
        for label, tensor in tensors.items():
            if not torch.isfinite(tensor).all():
                self._abort_experience()
                raise ValueError(
                    f"RebasinStrategy: experience {st.experience} produced non-finite values in {label}; "
                    f"training stopped and the model keeps θ_{st.experience}. Lower delta_lr/perm_lr or "
                    "check the loss and data of this experience."
                )
        return None

    def _abort_experience(self) -> None:
        self._rebasin = None
        self.optimizer = self.base_optimizer

    # -- the commit --------------------------------------------------------------------------------
    def _after_training_exp(self, **kwargs: Any) -> None:
        if self.rebasin_active:
            try:
                self._commit()
            finally:
                self._abort_experience()
        self.trained_experiences += 1
        super()._after_training_exp(**kwargs)

    @torch.no_grad()
    def _commit(self) -> None:
        st = self._rebasin
        assert st is not None
        hard = (
            st.logits.hard()
            if st.logits is not None
            else {g: torch.arange(n, device=self.device) for g, n in st.spec.group_sizes.items()}
        )
        permuted = permute_state(st.theta, st.spec, hard)
        committed: dict[str, Tensor] = {}
        for name, value in st.theta.items():
            if not value.is_floating_point():
                committed[name] = value
                continue
            new = (1 - self.alpha) * value + self.alpha * permuted[name]
            if name in st.delta:
                new = new + st.delta[name]
            if not torch.isfinite(new).all():
                raise ValueError(
                    f"RebasinStrategy: experience {st.experience} produced non-finite values in "
                    f"'{name}'; the commit was refused and the model keeps θ_{st.experience}. "
                    "Lower delta_lr/perm_lr or check the data of this experience."
                )
            committed[name] = new
        load_state_(self.model, committed)
        try:
            if self.bn_reestimate:
                reestimate_batchnorm(self.model, self.dataloader, forward=self._forward_batch)
            self.reports.append(self._diagnose(st, hard, model_state(self.model)))
        except BaseException:
            load_state_(self.model, st.theta)  # the model keeps θ_i
            raise

    def _forward_batch(self, model: nn.Module, batch: Any) -> Tensor:
        """The model on an Avalanche minibatch ``[x, y, task]`` (task labels if multi-task)."""
        x = batch[0].to(self.device)
        if isinstance(model, MultiTaskModule):
            return model(x, batch[2].to(self.device))
        return model(x)

    def _diagnostic_batches(self) -> list[tuple[Tensor, Tensor, Tensor | None]]:
        dataset = self.experience.dataset
        n = min(len(dataset), self.diagnostic_samples)
        loader = DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=self.eval_mb_size or 256)
        batches = []
        for batch in loader:
            task = batch[2].to(self.device) if len(batch) > 2 else None
            batches.append((batch[0].to(self.device), batch[1].to(self.device), task))
        return batches

    def _accuracy(self, state: dict[str, Tensor], batches) -> float:
        was_training = self.model.training
        self.model.eval()
        correct = total = 0
        for x, y, task in batches:
            out = self._call({k: v.clone() for k, v in state.items()}, x, task)
            correct += int((out.argmax(-1) == y).sum())
            total += len(y)
        self.model.train(was_training)
        return correct / max(total, 1)

    def _diagnose(
        self, st: _ExperienceState, hard: dict[str, Tensor], committed: dict[str, Tensor]
    ) -> ExperienceReport:
        batches = self._diagnostic_batches()
        row_max = 1.0
        if st.logits is not None:
            plans = st.logits.plans(self.current_tau, self.sinkhorn_iters)
            row_max = sum(float(p.max(-1).values.mean()) for p in plans.values()) / len(plans)
        moved = sum(int((idx != torch.arange(len(idx), device=idx.device)).sum()) for idx in hard.values())
        return ExperienceReport(
            experience=st.experience,
            mean_row_max=row_max,
            units_moved=moved,
            units_total=sum(st.spec.group_sizes.values()),
            acc_trained=self._accuracy(self._merged_state(), batches),
            acc_rounded=self._accuracy(self._merged_state(hard), batches),
            acc_committed=self._accuracy(committed, batches),
            delta_norm=float(sum((d**2).sum() for d in st.delta.values()) ** 0.5),
        )


def _check_hyperparameters(**values: Any) -> None:
    def bad(name: str, rule: str) -> ValueError:
        return ValueError(f"RebasinStrategy: {name} must be {rule}, got {values[name]!r}.")

    def finite(v: Any) -> bool:
        return isinstance(v, (int, float)) and math.isfinite(v)

    for name in ("alpha", "train_alpha"):
        if not (finite(values[name]) and 0 <= values[name] <= 1):
            raise bad(name, "in [0, 1]")
    if values["tau_final"] is not None and not (finite(values["tau_final"]) and values["tau_final"] > 0):
        raise bad("tau_final", "None or > 0")
    if values["perm_init"] not in ("identity", "similarity"):
        raise bad("perm_init", "'identity' or 'similarity'")
    if values["delta_optimizer"] not in ("sgd", "adam"):
        raise bad("delta_optimizer", "'sgd' or 'adam'")
    if values["rebasin_steps"] is not None and not (
        isinstance(values["rebasin_steps"], int) and values["rebasin_steps"] >= 1
    ):
        raise bad("rebasin_steps", "None or a positive integer")
    if not (finite(values["beta"]) and values["beta"] >= 0):
        raise bad("beta", ">= 0")
    for name in ("tau", "perm_lr"):
        if not (finite(values[name]) and values[name] > 0):
            raise bad(name, "> 0")
    for name in ("perm_init_noise", "delta_init_std", "delta_lr"):
        if not (finite(values[name]) and values[name] >= 0):
            raise bad(name, ">= 0")
    if values["delta_clip"] is not None and not (finite(values["delta_clip"]) and values["delta_clip"] > 0):
        raise bad("delta_clip", "None or > 0")
    for name in ("sinkhorn_iters", "rebasin_epochs", "train_epochs"):
        if not (isinstance(values[name], int) and values[name] >= 1):
            raise bad(name, "a positive integer")

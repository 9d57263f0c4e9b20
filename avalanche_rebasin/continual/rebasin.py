"""The Re-basin method without Avalanche: the network trained at one experience, and its commit.

:class:`RebasinNetwork` is a real ``nn.Module`` that computes

    f( (1 − a) θ_i + a π_P(θ_i) + δ ),   P = Sinkhorn(X / τ)  (or P̂ + P − sg(P), straight-through)

with ``θ_i`` held as buffers and ``δ`` and the logits ``X`` as its only parameters, so an
optimiser, an early-stopping rule or a checkpoint that acts on the module acts on what
is trained. :meth:`RebasinNetwork.committed_state` gives ``θ_{i+1} = (1 − α)θ_i + απ_P̂(θ_i) + δ``.
Parameters the user froze (``requires_grad=False``) get no δ and are never permuted: every
group that touches one keeps the identity, so they stay bit-identical.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..alignment.matching import similarity_matrix
from ..core.logits import PermutationLogits
from ..core.permute import identity_permutation, permute_state, soft_permute_state
from ..core.sinkhorn import Sinkhorn, permutation_matrix
from ..core.spec import PermutationSpec
from ..core.state import interpolate_state, mix, model_state
from ..core.validation import check_finite
from .association import MixedLinearWeight, plain_linear_weights
from .config import RebasinConfig
from .grouped_optimizer import GroupedOptimizer

__all__ = [
    "ExperienceReport",
    "RebasinNetwork",
    "add_penalty_gradient",
    "check_trainable",
    "clip_delta_gradients",
    "committed_state",
    "delta_penalty",
    "experience_report",
    "first_non_finite",
    "make_optimizer",
    "penalty_value",
]


def _key(name: str) -> str:
    """A tensor name as a module attribute ('.' is not allowed there)."""
    return name.replace(".", "/")


@dataclass
class ExperienceReport:
    """Diagnostics of one committed experience.

    ``mean_row_max``: mean over rows of the soft plan's largest entry (1 for a permutation,
    ``1/n`` for the uniform plan), averaged over groups; ``units_moved``: units the hard
    permutation moves; ``acc_trained`` / ``acc_rounded`` / ``acc_committed``: accuracy of the
    trained network, of the same with ``P̂``, and of ``θ_{i+1}`` on up to
    ``diagnostic_samples`` samples of the experience (None when that is 0).
    """

    experience: int
    mean_row_max: float
    units_moved: int
    units_total: int
    delta_norm: float
    acc_trained: float | None = None
    acc_rounded: float | None = None
    acc_committed: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


def check_trainable(model: nn.Module, label: str) -> None:
    """Refuse weights the method would only turn into NaN, naming the tensor: non-finite values
    (a NaN in a buffer) and float16 trainable parameters (δ and the logits would be trained in
    float16, whose optimiser steps overflow)."""
    buffers = {n for n, _ in model.named_buffers()}
    check_finite(model_state(model), label, buffers)
    trained = (n for n, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float16)
    half = next(trained, None)
    if half is not None:
        raise ValueError(
            f"{label}: parameter '{half}' is float16; δ and the permutation logits would be trained in "
            "float16, whose optimiser steps overflow to NaN. Convert the model first: model.float() "
            "(and feed it float32 inputs)."
        )


class RebasinNetwork(nn.Module):
    """``model`` re-parametrised for one re-basin experience; ``model`` itself is not modified.

    Args:
        model: the network holding ``θ_i`` (read once; its weights are not changed here).
        spec: its permutation spec.
        config: the method's settings.
        experience: index of the experience (seeds δ and the logits with ``config.seed``).
        steps_total: optimiser steps planned (for τ annealing).
    """

    base: nn.Module  # the user's module, kept outside the submodules (see __init__)

    def __init__(
        self,
        model: nn.Module,
        spec: PermutationSpec,
        config: RebasinConfig,
        *,
        experience: int,
        steps_total: int = 1,
    ) -> None:
        super().__init__()
        self.__dict__["base"] = model  # not a submodule: θ_i must not be a trainable parameter here
        self.config, self.experience = config, experience
        check_trainable(model, f"RebasinNetwork: the model at experience {experience}")
        theta = {k: v.detach().clone() for k, v in model_state(model).items()}
        spec.validate(theta)
        self.units_total = sum(spec.group_sizes.values())
        self.parameter_names = {n for n, _ in model.named_parameters()}
        self.trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        self.delta_names = set(self.trainable)
        frozen = self.parameter_names - self.delta_names
        unpermuted = spec.groups_touching(frozen) if config.permute else spec.groups
        self.spec = spec.without_groups(*unpermuted)
        self.names = list(theta)
        self.theta = _buffers(theta)
        # the trained network's own running statistics, updated by its training forwards
        self.running = _buffers({k: v.clone() for k, v in theta.items() if k not in self.parameter_names})
        generator = torch.Generator().manual_seed(config.seed * 100_003 + experience)
        self.delta = _initial_delta(theta, self.trainable, config.delta_init_std, generator)
        self.permutation: PermutationLogits | None = None
        if len(self.spec):
            init = _initial_logits(theta, self.spec, config, self.parameter_names, generator)
            self.permutation = PermutationLogits(self.spec, init).to(next(iter(theta.values())).device)
        self.steps_done = 0
        self.steps_total = max(int(steps_total), 1)
        # layers whose F.linear may run in activation space (see continual.association)
        in_activations = (
            self.permutation is not None and config.association != "weight" and config.train_alpha
        )
        self.linear_groups = (
            plain_linear_weights(model, self.spec, self.delta_names) if in_activations else {}
        )

    def theta_state(self) -> dict[str, Tensor]:
        buffers = self.theta._buffers
        return {n: buffers[_key(n)] for n in self.names}  # type: ignore[misc]  # all registered

    def delta_state(self) -> dict[str, Tensor]:
        return {n: self.delta[_key(n)] for n in self.trainable}

    @property
    def tau(self) -> float:
        """τ now: ``tau · (tau_final / tau)^(t / (T − 1))`` when annealed."""
        tau, final = self.config.sinkhorn.tau, self.config.tau_final
        if final is None:
            return tau
        progress = min(self.steps_done / max(self.steps_total - 1, 1), 1.0)
        return tau * (final / tau) ** progress

    @property
    def solver(self) -> Sinkhorn:
        """The configured Sinkhorn operator, at the annealed τ when ``tau_final`` is set."""
        if self.config.tau_final is None:
            return self.config.sinkhorn
        return dataclasses.replace(self.config.sinkhorn, tau=self.tau)

    def plans(self) -> dict[str, Tensor]:
        """The plans used in training: soft, or the hard forward with the soft gradient."""
        assert self.permutation is not None
        plans = self.permutation.plans(self.solver, warm_start=self.config.warm_start)
        if not self.config.straight_through:
            return plans
        hard = self.permutation.hard()
        return {g: permutation_matrix(hard[g], p.dtype) + p - p.detach() for g, p in plans.items()}

    def hard_permutations(self) -> dict[str, Tensor]:
        return {} if self.permutation is None else self.permutation.hard()

    def trained_state(self, hard: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """``(1 − a)θ + aπ(θ) + δ`` for trainable parameters (the training plans, or ``hard``),
        θ for frozen ones, the network's own running buffers for the rest. With the soft
        plans, plain linear weights are :class:`MixedLinearWeight` (evaluated in the cheaper
        association order)."""
        theta, a = self.theta_state(), self.config.train_alpha
        assert a is not None  # RebasinConfig sets it (to alpha when not given)
        lazy: dict[str, Tensor] = {}
        if hard is not None:
            permuted = permute_state(theta, self.spec, hard)
        elif self.permutation is not None:
            plans = self.plans()
            lazy = {name: self._mixed_linear(name, theta[name], plans, a) for name in self.linear_groups}
            permuted = soft_permute_state({k: v for k, v in theta.items() if k not in lazy}, self.spec, plans)
        else:
            permuted = theta
        state = {}
        for name in self.names:
            if name in lazy:
                state[name] = lazy[name]
            elif name in self.delta_names:
                delta = self.delta[_key(name)]
                unmoved = permuted[name] is theta[name]  # (1 − a)θ + aθ = θ exactly
                state[name] = (
                    theta[name] + delta
                    if unmoved
                    else mix(theta[name], permuted[name], a, finite=True) + delta
                )
            elif name in self.parameter_names:
                state[name] = theta[name]  # frozen by the user
            else:
                state[name] = self.running._buffers[_key(name)]  # type: ignore[assignment]
        return state

    def _mixed_linear(
        self, name: str, theta: Tensor, plans: Mapping[str, Tensor], a: float
    ) -> MixedLinearWeight:
        delta, (out_group, in_group) = self.delta[_key(name)], self.linear_groups[name]

        def formed() -> Tensor:  # W_mid in weight space, as trained_state forms every other tensor
            return (
                mix(theta, soft_permute_state({name: theta}, self.spec, plans)[name], a, finite=True) + delta
            )

        pair = (plans[out_group] if out_group else None, plans[in_group] if in_group else None)
        return MixedLinearWeight(theta, delta, a, pair, formed, self.config.association)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.base, self.trained_state(), args, kwargs)

    def train(self, mode: bool = True) -> RebasinNetwork:
        super().train(mode)
        self.base.train(mode)  # the forward runs the user's module, in this mode
        return self


def delta_penalty(network: RebasinNetwork) -> Tensor:
    """``β‖δ‖²``, differentiable."""
    return network.config.beta * sum((d**2).sum() for d in network.delta.values())


@torch.no_grad()
def penalty_value(network: RebasinNetwork) -> Tensor:
    """``β‖δ‖²`` as a value (no graph): one fused norm over every δ, on their device."""
    deltas = list(network.delta.values())
    if not deltas:
        return torch.zeros(())
    return network.config.beta * torch.stack(torch._foreach_norm(deltas)).square().sum()


@torch.no_grad()
def add_penalty_gradient(network: RebasinNetwork) -> None:
    """Add ``∂β‖δ‖²/∂δ = 2βδ`` to δ's gradients directly, one fused operation: the penalty's
    gradient without a graph through ``‖δ‖²`` (and, under DDP, without a second use of a δ
    the forward did not use)."""
    beta = network.config.beta
    if not beta:
        return
    with_grad = [d for d in network.delta.values() if d.grad is not None]
    if with_grad:
        torch._foreach_add_([d.grad for d in with_grad if d.grad is not None], with_grad, alpha=2 * beta)
    for d in network.delta.values():
        if d.grad is None:
            d.grad = 2 * beta * d


def clip_delta_gradients(network: RebasinNetwork) -> None:
    """Clip δ's gradients to ``±delta_clip`` (the published protocol's ±1e-3); with
    ``penalty_after_clip`` the penalty's gradient is added after the clip (see
    :func:`add_penalty_gradient`), otherwise before it."""
    if network.config.delta_clip is not None:
        torch.nn.utils.clip_grad_value_(list(network.delta.values()), network.config.delta_clip)


def make_optimizer(network: RebasinNetwork) -> GroupedOptimizer:
    """AdamW on the logits (``perm_lr``, ``perm_weight_decay``) and SGD or Adam on δ
    (``delta_lr``); Adam runs fused (one pass over each tensor) where torch has the kernel."""
    c = network.config
    # a frozen placeholder keeps the optimiser valid when the user froze every parameter
    deltas = list(network.delta.values()) or [nn.Parameter(torch.zeros(()), requires_grad=False)]
    delta_part = (
        _adam(deltas, c.delta_lr) if c.delta_optimizer == "adam" else torch.optim.SGD(deltas, lr=c.delta_lr)
    )
    parts: list[torch.optim.Optimizer] = [delta_part]
    if network.permutation is not None:
        parts.insert(0, _adam(list(network.permutation.parameters()), c.perm_lr, c.perm_weight_decay))
    return GroupedOptimizer(parts)


def _adam(parameters: list[nn.Parameter], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam, or AdamW with a decoupled ``weight_decay`` (without one they are the same update)."""
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in parameters) or None
    if weight_decay:
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=fused)
    return torch.optim.Adam(parameters, lr=lr, fused=fused)


def first_non_finite(network: RebasinNetwork) -> str | None:
    """The first trained tensor with a NaN or an infinity, by name, or None (one host sync)."""
    tensors = {f"δ of '{n}'": d for n, d in network.delta_state().items()}
    if network.permutation is not None:
        names, logits = network.permutation.names, network.permutation.logits
        tensors.update({f"permutation logits of group '{g}'": x for g, x in zip(names, logits)})
    if not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors.values()]).all()):
        return None
    return next(label for label, t in tensors.items() if not torch.isfinite(t).all())


@torch.no_grad()
def committed_state(network: RebasinNetwork) -> dict[str, Tensor]:
    """``θ_{i+1} = (1 − α)θ_i + απ_P̂(θ_i) + δ``; frozen parameters and integer buffers are θ_i's."""
    theta, alpha = network.theta_state(), network.config.alpha
    permuted = permute_state(theta, network.spec, network.hard_permutations())
    frozen = network.parameter_names - network.delta_names
    committed = interpolate_state(theta, permuted, alpha, keep=frozen)
    for name, value in committed.items():
        if name in frozen or not value.is_floating_point():
            continue
        if name in network.delta_names:
            committed[name] = value = value + network.delta[_key(name)]
        if not torch.isfinite(value).all():
            raise ValueError(
                f"Re-basin: experience {network.experience} produced non-finite values in '{name}'; the "
                f"commit was refused and the model keeps θ_{network.experience}. Lower delta_lr/perm_lr or "
                "check the data of this experience."
            )
    return committed


@torch.no_grad()
def experience_report(network: RebasinNetwork) -> ExperienceReport:
    """The cheap diagnostics (no data pass)."""
    row_max = 1.0
    if network.permutation is not None:
        plans = network.permutation.plans(network.solver)
        row_max = sum(float(p.max(-1).values.mean()) for p in plans.values()) / len(plans)
    hard = network.hard_permutations()
    moved = sum(int((idx != torch.arange(len(idx), device=idx.device)).sum()) for idx in hard.values())
    return ExperienceReport(
        experience=network.experience,
        mean_row_max=row_max,
        units_moved=moved,
        units_total=network.units_total,
        delta_norm=float(sum((d**2).sum() for d in network.delta.values()) ** 0.5),
    )


def _buffers(tensors: Mapping[str, Tensor]) -> nn.Module:
    """A module holding ``tensors`` as buffers (names with '.' made attribute-safe)."""
    holder = nn.Module()
    for name, value in tensors.items():
        holder.register_buffer(_key(name), value)
    return holder


def _initial_delta(
    theta: Mapping[str, Tensor], trainable: list[str], std: float, generator: torch.Generator
) -> nn.ParameterDict:
    """δ ~ N(0, std²) for every trainable parameter (zeros when ``std == 0``)."""
    deltas = {_key(n): nn.Parameter(std * _randn_like(theta[n], generator)) for n in trainable}
    return nn.ParameterDict(deltas)


def _randn_like(tensor: Tensor, generator: torch.Generator) -> Tensor:
    """N(0, 1) drawn on the CPU from ``generator`` (device-independent), then moved like ``tensor``."""
    return torch.randn(tensor.shape, generator=generator).to(tensor)


def _initial_logits(
    theta: dict[str, Tensor],
    spec: PermutationSpec,
    config: RebasinConfig,
    parameter_names: set[str],
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """``I`` or the cosine similarity of θ's units (``perm_init``), plus ``perm_init_noise``·N(0, 1)."""
    out = {}
    for group, n in spec.group_sizes.items():
        if config.perm_init == "identity":
            base = torch.eye(n)
        else:
            keys = [k for k in spec.axes if k in parameter_names]
            identity = identity_permutation(spec, device=theta[keys[0]].device)
            gram = similarity_matrix(theta, theta, spec, identity, group, keys)
            norms = gram.diagonal().clamp_min(1e-12).sqrt()
            base = (gram / norms[:, None] / norms[None, :]).float().cpu()
        out[group] = base + config.perm_init_noise * torch.randn(n, n, generator=generator)
    return out

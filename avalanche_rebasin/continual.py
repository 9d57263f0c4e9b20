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

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .align import PermutationLogits
from .continual_config import RebasinConfig
from .grouped_optimizer import GroupedOptimizer
from .matching import similarity_matrix
from .permute import identity_permutation, model_state, permute_state, soft_permute_state
from .sinkhorn import permutation_matrix
from .spec import PermutationSpec

__all__ = ["ExperienceReport", "RebasinNetwork"]


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


class RebasinNetwork(nn.Module):
    """``model`` re-parametrised for one re-basin experience; ``model`` itself is not modified.

    Args:
        model: the network holding ``θ_i`` (read once; its weights are not changed here).
        spec: its permutation spec.
        config: the method's settings.
        experience: index of the experience (seeds δ and the logits with ``config.seed``).
        steps_total: optimiser steps planned (for τ annealing).
    """

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
        theta = {k: v.detach().clone() for k, v in model_state(model).items()}
        spec.validate(theta)
        self.trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        self.units_total = sum(spec.group_sizes.values())
        touched = {g for g, members in spec.members.items() if any(m.tensor in frozen for m in members)}
        self.spec = spec.without_groups(*touched) if config.permute else spec.without_groups(*spec.groups)
        self.names = list(theta)
        self.parameter_names = {n for n, _ in model.named_parameters()}
        self.theta, self.running = nn.Module(), nn.Module()
        for name, value in theta.items():
            self.theta.register_buffer(_key(name), value)
            if name not in self.parameter_names:  # the trained network's own running statistics
                self.running.register_buffer(_key(name), value.clone())
        generator = torch.Generator().manual_seed(config.seed * 100_003 + experience)
        self.delta = nn.ParameterDict(
            {
                _key(n): nn.Parameter(
                    config.delta_init_std * torch.randn(theta[n].shape, generator=generator).to(theta[n])
                )
                for n in self.trainable
            }
        )
        self.permutation: PermutationLogits | None = None
        if len(self.spec):
            device = next(iter(theta.values())).device
            init = {
                g: self._initial_logits(theta, g, n)
                + config.perm_init_noise * torch.randn(n, n, generator=generator)
                for g, n in self.spec.group_sizes.items()
            }
            self.permutation = PermutationLogits(self.spec, init).to(device)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.steps_total = max(int(steps_total), 1)

    # -- what is trained -----------------------------------------------------------------
    def theta_state(self) -> dict[str, Tensor]:
        return {n: self.theta.get_buffer(_key(n)) for n in self.names}

    def delta_state(self) -> dict[str, Tensor]:
        return {n: self.delta[_key(n)] for n in self.trainable}

    @property
    def tau(self) -> float:
        """τ now: ``tau · (tau_final / tau)^(t / (T − 1))`` when annealed."""
        c = self.config
        if c.tau_final is None:
            return c.tau
        progress = min(int(self.steps_done) / max(self.steps_total - 1, 1), 1.0)
        return c.tau * (c.tau_final / c.tau) ** progress

    def plans(self) -> dict[str, Tensor]:
        """The plans used in training: soft, or the hard forward with the soft gradient."""
        assert self.permutation is not None
        plans = self.permutation.plans(self.tau, self.config.sinkhorn_iters)
        if not self.config.straight_through:
            return plans
        hard = self.permutation.hard()
        return {g: permutation_matrix(hard[g], p.dtype) + p - p.detach() for g, p in plans.items()}

    def hard_permutations(self) -> dict[str, Tensor]:
        if self.permutation is None:
            return identity_permutation(self.spec)
        return self.permutation.hard()

    def trained_state(self, hard: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """``(1 − a)θ + aπ(θ) + δ`` for parameters (the training plans, or ``hard``), the
        network's own running buffers for the rest."""
        theta, a = self.theta_state(), self.config.train_alpha
        if hard is not None:
            permuted = permute_state(theta, self.spec, hard)
        elif self.permutation is not None:
            permuted = soft_permute_state(theta, self.spec, self.plans())
        else:
            permuted = theta
        state = {}
        for name in self.names:
            if name in self.delta_names:
                state[name] = (1 - a) * theta[name] + a * permuted[name] + self.delta[_key(name)]
            elif name in self.parameter_names:
                state[name] = theta[name]  # frozen by the user
            else:
                state[name] = self.running.get_buffer(_key(name))
        return state

    @property
    def delta_names(self) -> set[str]:
        return set(self.trainable)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.base, self.trained_state(), args, kwargs)

    def train(self, mode: bool = True) -> RebasinNetwork:
        super().train(mode)
        self.base.train(mode)  # the forward runs the user's module, in this mode
        return self

    def delta_penalty(self) -> Tensor:
        """``β‖δ‖²``."""
        return self.config.beta * sum((d**2).sum() for d in self.delta.values())

    # -- optimisation --------------------------------------------------------------------
    def make_optimizer(self) -> GroupedOptimizer:
        """Adam on the logits (``perm_lr``) and SGD or Adam on δ (``delta_lr``)."""
        c = self.config
        delta_cls = torch.optim.Adam if c.delta_optimizer == "adam" else torch.optim.SGD
        parts: list[torch.optim.Optimizer] = [
            delta_cls(list(self.delta.values()) or [_dummy()], lr=c.delta_lr)
        ]
        if self.permutation is not None:
            parts.insert(0, torch.optim.Adam(self.permutation.parameters(), lr=c.perm_lr))
        return GroupedOptimizer(parts)

    def clip_delta_gradients(self) -> None:
        if self.config.delta_clip is not None:
            torch.nn.utils.clip_grad_value_(list(self.delta.values()), self.config.delta_clip)

    def non_finite(self) -> str | None:
        """The first trained tensor with a NaN or an infinity, by name, or None."""
        tensors = {f"δ of '{n}'": d for n, d in self.delta_state().items()}
        if self.permutation is not None:
            tensors.update(
                {
                    f"permutation logits of group '{g}'": x
                    for g, x in zip(self.permutation.names, self.permutation.logits)
                }
            )
        return next((label for label, t in tensors.items() if not torch.isfinite(t).all()), None)

    # -- the commit ------------------------------------------------------------------------
    @torch.no_grad()
    def committed_state(self) -> dict[str, Tensor]:
        """``θ_{i+1} = (1 − α)θ_i + απ_P̂(θ_i) + δ``; frozen parameters and integer buffers are θ_i's."""
        theta, alpha = self.theta_state(), self.config.alpha
        permuted = permute_state(theta, self.spec, self.hard_permutations())
        committed = {}
        for name, value in theta.items():
            if not value.is_floating_point() or (
                name in self.parameter_names and name not in self.delta_names
            ):
                committed[name] = value.clone()
                continue
            new = (1 - alpha) * value + alpha * permuted[name]
            if name in self.delta_names:
                new = new + self.delta[_key(name)]
            if not torch.isfinite(new).all():
                raise ValueError(
                    f"Re-basin: experience {self.experience} produced non-finite values in '{name}'; the "
                    f"commit was refused and the model keeps θ_{self.experience}. Lower delta_lr/perm_lr or "
                    "check the data of this experience."
                )
            committed[name] = new
        return committed

    @torch.no_grad()
    def report(self) -> ExperienceReport:
        """The cheap diagnostics (no data pass)."""
        row_max = 1.0
        if self.permutation is not None:
            plans = self.permutation.plans(self.tau, self.config.sinkhorn_iters)
            row_max = sum(float(p.max(-1).values.mean()) for p in plans.values()) / len(plans)
        hard = self.hard_permutations()
        moved = sum(int((idx != torch.arange(len(idx), device=idx.device)).sum()) for idx in hard.values())
        return ExperienceReport(
            experience=self.experience,
            mean_row_max=row_max,
            units_moved=moved,
            units_total=self.units_total,
            delta_norm=float(sum((d**2).sum() for d in self.delta.values()) ** 0.5),
        )

    def _initial_logits(self, theta: dict[str, Tensor], group: str, n: int) -> Tensor:
        if self.config.perm_init == "identity":
            return torch.eye(n)
        keys = [k for k in self.spec.axes if k in self.parameter_names]
        identity = identity_permutation(self.spec, device=theta[keys[0]].device)
        gram = similarity_matrix(theta, theta, self.spec, identity, group, keys)
        norms = gram.diagonal().clamp_min(1e-12).sqrt()
        return (gram / norms[:, None] / norms[None, :]).float().cpu()


def _dummy() -> nn.Parameter:
    """A placeholder so an optimiser can exist when every parameter is frozen."""
    return nn.Parameter(torch.zeros(()), requires_grad=False)

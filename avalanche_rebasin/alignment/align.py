"""Learn permutations by gradient descent through the Sinkhorn operator.

For every group ``g`` a logit matrix ``X_g`` is optimised so that the soft
permutation ``P_g = Sinkhorn(X_g / τ)`` minimises a cost of ``θ_A`` and
``π_P(θ_B)`` (see :mod:`avalanche_rebasin.core.costs`). The result is the hard
permutation ``argmax_P Σ ⟨P, X⟩`` (linear assignment on the logits), which maps
``model_b`` into ``model_a``'s basin.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..core.costs import CosineCost, Cost, L1Cost, L2Cost, MidpointCost, RandomPointCost
from ..core.logits import PermutationLogits
from ..core.model_inputs import floating_to
from ..core.permute import identity_permutation, permute, soft_permute_state
from ..core.sinkhorn import Sinkhorn, marginal_error, permutation_matrix
from ..core.spec import PermutationSpec
from ..core.state import LossFn, model_state, private_copy
from ..core.validation import check_integer, check_real
from .convergence import Convergence, Stopping, ZeroCost, greedy_permutations
from .inputs import batch_stream, check_compatible, resolve_spec
from .matching import weight_matching_state

__all__ = ["AlignResult", "align"]

CostName = Literal["l2", "l1", "cosine", "mid", "rnd"]
Init = Literal["identity", "random", "weight_matching"]


@dataclass
class AlignResult:
    """What :func:`align` found.

    Attributes:
        permutations: group → index tensor; ``permute(model_b, spec, permutations)``
            lands in ``model_a``'s basin.
        model: that permuted copy of ``model_b``.
        logits: the learned logits per group.
        history: cost after every optimisation step.
        steps, seconds: optimisation steps taken and wall time.
        marginal_error: the last plans' marginal error ``max |P·1 − 1|, |Pᵀ·1 − 1|``;
            ``plans_balanced``: within the solver's threshold (1e-3 by default), where
            the implicit gradient is exact. ``None`` and ``True`` when no Sinkhorn step ran
            (``steps == 0``: the start was already optimal, or there is nothing to permute).
        data_exhausted: True when a one-shot ``data`` iterator ran out before ``steps``
            (the optimisation then stopped early, after ``steps`` steps).
        stop_reason: ``"optimal"`` (a weight cost reached zero, see
            :attr:`Stopping.at_zero_cost`, or nothing to permute), ``"converged"`` (the
            hard permutation stopped changing, see :attr:`Stopping.patience`),
            ``"max_steps"``, ``"callback"`` or ``"data_exhausted"``; ``converged`` is True
            for the first two.
    """

    permutations: dict[str, Tensor]
    model: nn.Module
    spec: PermutationSpec
    logits: dict[str, Tensor]
    history: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    marginal_error: float | None = None
    data_exhausted: bool = False
    stop_reason: str = "max_steps"
    plans_balanced: bool = True

    @property
    def converged(self) -> bool:
        """Whether the optimisation stopped at a fixed point (``"converged"`` or ``"optimal"``)."""
        return self.stop_reason in ("converged", "optimal")

    @property
    def sinkhorn_converged(self) -> bool:
        """Deprecated name of :attr:`plans_balanced`."""
        warnings.warn(
            "AlignResult.sinkhorn_converged is deprecated; read plans_balanced.",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.plans_balanced


def _make_cost(
    cost: CostName | Cost, model: nn.Module, keys: list[str], loss_fn: LossFn | None, seed: int
) -> tuple[Cost, bool]:
    """The cost callable and whether it needs data."""
    if callable(cost):
        return cost, True
    weight_costs: dict[str, Callable[[list[str]], Cost]] = {"l2": L2Cost, "l1": L1Cost, "cosine": CosineCost}
    if cost in weight_costs:
        return weight_costs[cost](keys), False
    loss_fn = loss_fn or nn.functional.cross_entropy
    model = private_copy(model) if cost in ("mid", "rnd") else model  # its forward may mutate it
    if cost == "mid":
        return MidpointCost(model, loss_fn), True
    if cost == "rnd":
        return RandomPointCost(model, loss_fn, torch.Generator().manual_seed(seed)), True
    raise ValueError(f"Unknown cost {cost!r}; use 'l2', 'l1', 'cosine', 'mid', 'rnd' or a callable.")


def _initial_logits(
    spec: PermutationSpec, init: Init, theta_a, theta_b, keys, generator, device, dtype
) -> dict[str, Tensor]:
    if init == "identity":
        return {g: torch.eye(n, device=device, dtype=dtype) for g, n in spec.group_sizes.items()}
    if init == "random":
        return {
            g: torch.randn(n, n, generator=generator).to(device, dtype) for g, n in spec.group_sizes.items()
        }
    if init == "weight_matching":
        perms, _ = weight_matching_state(theta_a, theta_b, spec, keys=keys, generator=generator)
        return {g: permutation_matrix(p, dtype).to(device) for g, p in perms.items()}
    raise ValueError(f"Unknown init {init!r}; use 'identity', 'random' or 'weight_matching'.")


def _batches(data: Iterable | None, needs_data: bool, cost: Any, dtype: torch.dtype | None) -> Iterator[Any]:
    """``None`` forever for weight costs; else :func:`batch_stream` (missing or empty data
    raises here), its floating tensors cast to ``dtype`` when given."""
    if not needs_data:
        return itertools.repeat(None)
    if data is None:
        raise ValueError(
            f"cost={cost!r} evaluates the task loss: pass data= (an iterable of (x, y) batches)."
        )
    stream = batch_stream(data, "data")
    return stream if dtype is None else (floating_to(batch, dtype) for batch in stream)


def _cost_label(cost: Any) -> str:
    return repr(cost) if isinstance(cost, str) else getattr(cost, "__name__", type(cost).__name__)


def _check_cost_value(value: Any, cost: Any) -> None:
    """The first value of ``cost``: a scalar tensor with a gradient path to the plans."""
    label = _cost_label(cost)
    if not isinstance(value, Tensor):
        raise TypeError(
            f"cost {label} returned {type(value).__name__}; it must return a scalar torch.Tensor "
            "computed from theta_b_permuted with torch operations (no float()/.item())."
        )
    if value.numel() != 1:
        raise ValueError(
            f"cost {label} returned a tensor of shape {tuple(value.shape)}; it must return a "
            "scalar tensor: reduce it (e.g. .sum() or .mean())."
        )
    if not value.requires_grad:
        raise ValueError(
            f"cost {label} returned a tensor that does not depend on the permuted state "
            "(no gradient reaches the permutations); compute it from theta_b_permuted with "
            "differentiable torch operations (no .detach() or torch.no_grad())."
        )


def _identity_result(model_b: nn.Module, spec: PermutationSpec, state: Mapping[str, Tensor]) -> AlignResult:
    """Nothing to permute (no parameter in the spec): identity permutations, a copy of ``model_b``."""
    perms = identity_permutation(spec, device=next(iter(state.values()), torch.empty(0)).device)
    return AlignResult(perms, permute(model_b, spec, perms), spec, {}, stop_reason="optimal")


class _Loop:
    """Adam on the logits until ``steps``, convergence, the callback or the data's end."""

    def __init__(
        self,
        logits: PermutationLogits,
        optimizer: torch.optim.Optimizer,
        convergence: Convergence,
        zero_cost: ZeroCost | None,
    ):
        self.logits, self.optimizer, self.convergence = logits, optimizer, convergence
        self.zero_cost = zero_cost

    def optimal(self, blocks: dict[str, int]) -> bool:
        """Whether the current hard permutation has zero cost (never, without a ``ZeroCost``)."""
        return self.zero_cost is not None and self.zero_cost.reached(
            *greedy_permutations(self.logits.as_views(), blocks)
        )

    def run(self, loss_of, batches, steps: int, solver: Sinkhorn, cost, callback, progress: bool):
        plans: dict[str, Tensor] = {}
        blocks = {g: self.logits.spec.blocks(g) for g in self.logits.names}
        if self.optimal(blocks):  # e.g. a weight-matching start that already maps B onto A
            return plans, "optimal"
        bar = tqdm(range(steps), desc="align", disable=not progress, leave=False)
        for step in bar:
            batch = next(batches, _END)
            if batch is _END:
                warnings.warn(
                    f"align: data ran out after {step} of {steps} steps; stopped there.", stacklevel=3
                )
                return plans, "data_exhausted"
            plans = self.logits.plans(solver)
            loss = loss_of(plans, batch)
            if step == 0:
                _check_cost_value(loss, cost)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            value = float(loss.detach())
            bar.set_postfix(cost=f"{value:.4g}")
            greedy, valid = greedy_permutations(self.logits.as_views(), blocks)
            converged = self.convergence.update(value, greedy, valid)
            optimal = self.zero_cost is not None and self.zero_cost.reached(greedy, valid)
            # the callback sees every step, the one a stopping rule ends on included
            asked_to_stop = callback is not None and callback(step, value, self.logits)
            if converged:
                return plans, "converged"
            if optimal:
                return plans, "optimal"
            if asked_to_stop:
                return plans, "callback"
        return plans, "max_steps"


def align(
    model_a: nn.Module,
    model_b: nn.Module,
    *,
    example_input: Any = None,
    spec: PermutationSpec | None = None,
    cost: CostName | Cost = "l2",
    data: Iterable | None = None,
    loss_fn: LossFn | None = None,
    lr: float = 0.3,
    init: Init = "weight_matching",
    solver: Sinkhorn | None = None,
    stopping: Stopping | None = None,
    seed: int = 0,
    progress: bool = True,
    callback: Callable[[int, float, PermutationLogits], bool | None] | None = None,
    **deprecated: Any,
) -> AlignResult:
    """Find permutations that bring ``model_b`` into ``model_a``'s basin.

    Args:
        example_input: a batch ``model_a`` accepts; used to discover the spec.
        spec: a ready spec instead (one of the two is required).
        cost: ``"l2"`` (default), ``"l1"``, ``"cosine"``, ``"mid"``, ``"rnd"`` or a callable
            ``cost(theta_a, theta_b_permuted, batch)``; data costs read batches
            ``(x, y)`` from ``data``, cycling through it.
        lr: the learning rate of Adam on the logits.
        init: logits start at the weight-matching solution (default: a warm start that
            is exact for a permuted copy), at the identity, or at random.
        solver: the Sinkhorn operator (default ``Sinkhorn()``: τ = 1, 20 iterations,
            implicit backward).
        stopping: when to stop (default ``Stopping()``: at most 100 steps, patience 5,
            and at zero cost for ``"l2"``/``"l1"``); see :class:`Stopping`.
        callback: called as ``callback(step, cost, logits)`` after every step; returning
            True stops the optimisation early (e.g. once ``logits.hard()`` is right).
        deprecated: release 0.1's ``steps``, ``patience``, ``rtol``, ``stop_at_zero_cost``
            (now ``stopping``) and ``tau``, ``n_iter``, ``sinkhorn_backward``, ``sinkhorn``
            (now ``solver``), with a ``DeprecationWarning``, for one release.

    Data: a re-iterable ``data`` (list, DataLoader) is cycled; a one-shot iterator
    (generator) is read once, and if it runs out first the optimisation stops there
    (``result.data_exhausted``, with a warning).
    Nothing to permute (no parameter that the spec permutes, e.g. a model without
    parameters): returns identity permutations and a copy of ``model_b``, ``steps == 0``.

    Neither model is modified. Raises ``ValueError`` for mismatched architectures,
    non-finite weights, a data cost without data or with empty data, and
    ``TypeError``/``ValueError`` if a callable cost's first value is not a scalar tensor
    that depends on the permuted state.
    """
    solver, stopping = _release_0_1_settings(solver, stopping, deprecated)
    check_integer("seed", seed, 0)
    check_real("lr", lr, 0, strict=True)
    spec = resolve_spec(model_a, spec, example_input)
    check_compatible(model_a, model_b, spec)
    theta_a, theta_b = model_state(model_a), model_state(model_b)
    params = {name for name, _ in model_a.named_parameters()}
    keys = [k for k in spec.axes if k in params and theta_a[k].is_floating_point()]
    work = _working_dtype(theta_a, keys)
    upcast = bool(keys) and work != theta_a[keys[0]].dtype
    if upcast:
        theta_a, theta_b = _floating_state(theta_a, work), _floating_state(theta_b, work)
        model_a = private_copy(model_a).to(work)
    cost_fn, needs_data = _make_cost(cost, model_a, keys, loss_fn, seed)
    batches = _batches(data, needs_data, cost, work if upcast else None)
    if not keys:
        return _identity_result(model_b, spec, theta_a)
    ref = theta_a[keys[0]]
    generator = torch.Generator().manual_seed(seed)
    logits = PermutationLogits(
        spec, _initial_logits(spec, init, theta_a, theta_b, keys, generator, ref.device, work)
    )
    b_subset = theta_b if needs_data else {k: theta_b[k] for k in keys}
    lower_bounded = stopping.at_zero_cost and isinstance(cost, str) and cost in ("l2", "l1")
    zero_cost = ZeroCost(cost_fn, theta_a, b_subset, spec) if lower_bounded else None
    loop = _Loop(logits, torch.optim.Adam(logits.parameters(), lr=lr), Convergence(stopping), zero_cost)
    start = time.perf_counter()
    plans, reason = loop.run(
        lambda plans, batch: cost_fn(theta_a, soft_permute_state(b_subset, spec, plans), batch),
        batches,
        stopping.max_steps,
        solver,
        cost,
        callback,
        progress,
    )
    return _result(loop, plans, reason, model_b, solver, time.perf_counter() - start)


HALF_TYPES = (torch.float16, torch.bfloat16)
_OLD_SOLVER_KEYWORDS = {"tau": "tau", "n_iter": "n_iter", "sinkhorn_backward": "backward"}
_OLD_STOPPING_KEYWORDS = {
    "steps": "max_steps",
    "patience": "patience",
    "rtol": "rtol",
    "stop_at_zero_cost": "at_zero_cost",
}


def _release_0_1_settings(
    solver: Sinkhorn | None, stopping: Stopping | None, old: dict[str, Any]
) -> tuple[Sinkhorn, Stopping]:
    """``solver`` and ``stopping`` (their defaults if None) with release 0.1's keywords of
    :func:`align` folded in, with a ``DeprecationWarning``; an unknown keyword is a ``TypeError``."""
    known = {*_OLD_SOLVER_KEYWORDS, *_OLD_STOPPING_KEYWORDS, "sinkhorn"}
    unknown = sorted(set(old) - known)
    if unknown:
        raise TypeError(f"align() got an unexpected keyword argument {unknown[0]!r}.")
    if old:
        warnings.warn(
            f"align({', '.join(f'{k}=' for k in old)}) is deprecated and goes in the next release; "
            "pass solver=Sinkhorn(tau=..., n_iter=..., backward=...) and "
            "stopping=Stopping(max_steps=..., patience=..., rtol=..., at_zero_cost=...).",
            DeprecationWarning,
            stacklevel=3,
        )
    if "sinkhorn" in old:
        if solver is not None:
            raise TypeError("align(): pass the solver once, as solver= (sinkhorn= is its old name).")
        solver = old["sinkhorn"]  # its settings win over tau/n_iter/sinkhorn_backward, as in 0.1
    elif any(k in old for k in _OLD_SOLVER_KEYWORDS):
        changes = {new: old[k] for k, new in _OLD_SOLVER_KEYWORDS.items() if k in old}
        solver = dataclasses.replace(solver or Sinkhorn(), **changes)
    stopping = stopping or Stopping()
    if any(k in old for k in _OLD_STOPPING_KEYWORDS):
        changes = {new: old[k] for k, new in _OLD_STOPPING_KEYWORDS.items() if k in old}
        stopping = dataclasses.replace(stopping, **changes)
    if not isinstance(solver or Sinkhorn(), Sinkhorn):
        raise TypeError(f"align(): solver must be a Sinkhorn, got {type(solver).__name__}.")
    if not isinstance(stopping, Stopping):
        raise TypeError(f"align(): stopping must be a Stopping, got {type(stopping).__name__}.")
    return solver or Sinkhorn(), stopping


def _working_dtype(theta: Mapping[str, Tensor], keys: list[str]) -> torch.dtype:
    """The weights' dtype, float32 for half precision: Adam's first step on half-precision
    logits overflows, so those are solved in float32 (as the Sinkhorn operator computes)."""
    dtype = theta[keys[0]].dtype if keys else torch.float32
    return torch.float32 if dtype in HALF_TYPES else dtype


def _floating_state(state: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def _result(
    loop: _Loop, plans: dict[str, Tensor], reason: str, model_b: nn.Module, solver: Sinkhorn, seconds: float
):
    """The :class:`AlignResult` of a finished optimisation."""
    perms, history = loop.logits.hard(), loop.convergence.costs
    error = max((marginal_error(p) for p in plans.values()), default=None)
    return AlignResult(
        permutations=perms,
        model=permute(model_b, loop.logits.spec, perms),
        spec=loop.logits.spec,
        logits=loop.logits.as_dict(),
        history=history,
        steps=len(history),
        seconds=seconds,
        marginal_error=error,
        plans_balanced=error is None or solver.balanced(error),
        data_exhausted=reason == "data_exhausted",
        stop_reason=reason,
    )


_END = object()

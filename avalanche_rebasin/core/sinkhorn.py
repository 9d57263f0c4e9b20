"""Log-domain Sinkhorn operator with implicit differentiation, and hard matching.

Given logits ``X`` (``n × n``, optionally batched) and a temperature ``τ``, the
Sinkhorn operator returns the doubly-stochastic plan

    P = diag(e^α) · exp(X / τ) · diag(e^β),   P·1 = 1,  Pᵀ·1 = 1,

computed in the log domain by alternately normalising rows and columns
(``log S ← log S − logsumexp``). Index convention (shared by the whole library):
``P[c, j]`` is the weight with which unit ``j`` of the source lands on unit ``c``,
so a hard permutation is ``P[c, idx[c]] = 1`` and acts as ``t.index_select(axis, idx)``.

Implicit backward (Eisenberger et al., CVPR 2022). Differentiating the fixed point
``log P_ij = α_i + β_j + X_ij/τ`` under the marginal constraints gives, with the
upstream gradient ``G`` and ``Ĝ = G ⊙ P``,

    K [d_a; d_b] = [Ĝ·1; Ĝᵀ·1],   K = [[diag(P·1), P], [Pᵀ, diag(Pᵀ·1)]],
    ∂L/∂X = (1/τ) · (Ĝ − P ⊙ (d_a·1ᵀ + 1·d_bᵀ)).

``K`` has the null vector ``[1; −1]``; fixing ``d_b[n−1] = 0`` removes it. The solve
uses the Schur complement ``S = diag(b) − Pᵀ diag(1/a) P`` (size ``n−1`` instead of
``2n−1``), either densely (``"schur"``, O(n³)) or by matrix-free Jacobi-preconditioned
conjugate gradients (``"cg"``, O(n²) per iteration); ``"auto"`` (the default) runs a few
conjugate-gradient steps and solves densely only when they fall short, and ``"full"`` solves
the whole ``(2n−1)`` system (the reference). All add a small ridge so that a saturated plan
(``S → 0``) gives a finite (zero) gradient. Memory is ``O(n²)`` whatever the iteration count.

Warm starts (:class:`WarmStart`): logits trained by gradient descent move little per step,
so the forward can start from the last call's potentials and stop on the marginal-error
threshold, and the conjugate gradients from the last solution. The implicit gradient is
exact at the fixed point, so a converged warm start is more exact than a fixed number of
cold iterations, not less.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .validation import check_choice, check_integer, check_real

__all__ = [
    "Sinkhorn",
    "SinkhornOutput",
    "WarmStart",
    "hard_permutation",
    "marginal_error",
    "permutation_matrix",
    "sinkhorn",
]

BackwardMode = Literal["implicit", "unrolled"]
LinearSolver = Literal["auto", "schur", "cg", "full"]


def _check_shape(logits: Tensor) -> None:
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"Sinkhorn expects square logits of shape (..., n, n), got {tuple(logits.shape)}.")
    if not logits.is_floating_point():
        raise ValueError(f"Sinkhorn logits must be floating point, got dtype {logits.dtype}.")


@dataclass(frozen=True)
class _Range:
    """What one ``aminmax`` of the logits tells: the dtype Sinkhorn runs in, ``max |X/τ|``
    and ``max X`` (the kernel's shift)."""

    work_dtype: torch.dtype
    peak: float
    high: float


def _logit_range(logits: Tensor, tau: float) -> _Range:
    """One reduction and one host sync: refuses non-finite logits and chooses the work dtype
    (float32 for half/bfloat16, float64 if ``X / τ`` would overflow).

    The log-domain iteration forms differences ``X_ij/τ − logsumexp``, so it needs
    ``max |X/τ|`` well below the dtype's largest value; raises ``ValueError`` otherwise.
    """
    if logits.numel() == 0:
        return _Range(logits.dtype, 0.0, 0.0)
    low, high = (float(v) for v in torch.stack(torch.aminmax(logits.detach())).tolist())
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(
            "Sinkhorn logits contain NaN or infinite values; check the weights or the "
            "learning rate that produced them."
        )
    dtype = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
    peak = max(abs(low), abs(high)) / tau  # a Python float: inf rather than an error on overflow
    for candidate in (dtype, torch.float64):
        if peak <= torch.finfo(candidate).max / 8:
            return _Range(candidate, peak, high)
    raise ValueError(
        f"Sinkhorn: logits / tau overflows even in float64 (max |logits| = {peak * tau:.3g}, "
        f"tau = {tau:.3g}); use a larger tau or rescale the logits (e.g. logits / logits.abs().max())."
    )


@dataclass
class WarmStart:
    """What a Sinkhorn call leaves for the next one on slowly moving logits (ott-jax's ``init``).

    ``potentials``: the forward's column potentials ``β = log v`` (``P = diag(e^α) e^{X/τ}
    diag(e^β)``); the next forward starts from them instead of ``β = 0``. ``solution``: the
    implicit backward's last ``d_b``, the next conjugate-gradient solve's starting point.
    Pass one object to every call on the same logits; a change of shape starts cold.
    """

    potentials: Tensor | None = None
    solution: Tensor | None = None

    def start(self, like: Tensor, which: str) -> Tensor | None:
        value: Tensor | None = getattr(self, which)
        if value is None or value.shape != like.shape or value.device != like.device:
            return None
        return value.to(like.dtype)


_CHECK_EVERY = 5  # iterations between two marginal-error checks of a cold start (each a host sync)


def _row_error(log_s: Tensor) -> float:
    return float((torch.logsumexp(log_s, dim=-1).exp() - 1).abs().max())


def _log_sinkhorn(
    log_s: Tensor, n_iter: int, threshold: float | None = None, check_every: int = _CHECK_EVERY
) -> Tensor:
    """At most ``n_iter`` rounds of row then column normalisation in the log domain; with a
    ``threshold``, fewer once the row marginals are within it (columns are exact)."""
    for i in range(n_iter):
        log_s = log_s - torch.logsumexp(log_s, dim=-1, keepdim=True)
        log_s = log_s - torch.logsumexp(log_s, dim=-2, keepdim=True)
        if threshold is not None and (i + 1) % check_every == 0 and _row_error(log_s) <= threshold:
            break
    return log_s


_EXP_RANGE = {torch.float32: 60.0, torch.float64: 600.0}  # e^range: far from overflow


def _scaling_sinkhorn(
    logits: Tensor,
    n_iter: int,
    threshold: float | None = None,
    peak: float | None = None,
    *,
    tau: float = 1.0,
    high: float | None = None,
    init: Tensor | None = None,
    check_every: int = _CHECK_EVERY,
) -> tuple[Tensor, Tensor] | None:
    """The same iterates as :func:`_log_sinkhorn` on ``X/τ``, as matrix scaling:
    ``P = diag(u) K diag(v)`` with ``K = exp((X − max X)/τ)``, ``u = 1 / (K v)``,
    ``v = 1 / (Kᵀ u)``, from ``v = e^init`` (``init`` = column potentials; ones when None).
    Matrix-vector products instead of a logsumexp over the matrix per half-iteration, the
    kernel built in one buffer, and the stopping check reuses the next iteration's ``K v``.
    Used when the range of ``X/τ`` keeps ``u`` and ``v`` finite (``peak = max |X/τ|`` bounds
    it by ``2·peak``), else None (the log domain is used). Returns the plan and its column
    potentials ``log v``.
    """
    limit = _EXP_RANGE.get(logits.dtype)
    if limit is None or logits.numel() == 0:
        return None
    if peak is None:
        peak = float(logits.abs().amax()) / tau
    if 2 * peak > limit:
        return None
    kernel = torch.sub(logits, float(logits.amax()) if high is None else high)
    if tau != 1.0:
        kernel.mul_(1.0 / tau)
    kernel.exp_()  # entries in [e^(−2·peak), 1]
    v = (
        torch.ones(logits.shape[:-1], dtype=logits.dtype, device=logits.device)
        if init is None
        else init.exp()
    )
    kv = (kernel @ v.unsqueeze(-1)).squeeze(-1)
    for i in range(n_iter):
        u = kv.reciprocal()
        v = (kernel.transpose(-1, -2) @ u.unsqueeze(-1)).squeeze(-1).reciprocal_()
        if i + 1 == n_iter:
            break
        kv = (kernel @ v.unsqueeze(-1)).squeeze(-1)
        checked = threshold is not None and (i + 1) % check_every == 0
        if checked and float((u * kv - 1).abs().max()) <= (threshold or 0.0):
            break
    return kernel.mul_(u.unsqueeze(-1)).mul_(v.unsqueeze(-2)), v.log()


def _default_ridge(dtype: torch.dtype) -> float:
    return 100.0 * torch.finfo(dtype).eps


def _schur_rhs(plan: Tensor, t_a: Tensor, t_b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The marginals ``a = P·1``, ``b = Pᵀ·1`` and the right-hand side
    ``r = t_b − Pᵀ diag(1/a) t_a`` of the Schur system ``S d_b = r``."""
    a = plan.sum(-1)  # (..., n)
    b = plan.sum(-2)
    rhs = t_b - (plan.transpose(-1, -2) @ (t_a / a).unsqueeze(-1)).squeeze(-1)
    return a, b, rhs


def _schur_matrix(plan: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``S = diag(b) − Pᵀ diag(1/a) P`` without its last row and column (O(n³))."""
    schur = torch.diag_embed(b) - plan.transpose(-1, -2) @ (plan / a.unsqueeze(-1))
    return schur[..., :-1, :-1]


def _min_norm_solve(matrix: Tensor, rhs: Tensor) -> Tensor:
    """Minimum-norm solution of symmetric ``matrix x = rhs`` (batched): eigen-solve, least
    squares where LAPACK fails. A non-finite system (NaN upstream gradient) gives NaN, as autograd would.
    """
    finite = torch.isfinite(matrix).flatten(-2).all(-1) & torch.isfinite(rhs).all(-1)
    out = torch.full_like(rhs, float("nan"))
    if not finite.any():
        return out
    matrix, rhs = matrix[finite], rhs[finite]
    try:
        values, vectors = torch.linalg.eigh(matrix)
        cutoff = values.abs().amax(-1, keepdim=True) * matrix.shape[-1] * torch.finfo(values.dtype).eps
        inverse = torch.where(values.abs() > cutoff, 1.0 / values, torch.zeros_like(values))
        projected = (vectors.transpose(-1, -2) @ rhs.unsqueeze(-1)).squeeze(-1)
        out[finite] = (vectors @ (inverse * projected).unsqueeze(-1)).squeeze(-1)
    except RuntimeError:  # LAPACK did not converge: SVD-based least squares on the CPU
        cpu = torch.linalg.lstsq(matrix.cpu().double(), rhs.cpu().double().unsqueeze(-1), driver="gelsd")
        out[finite] = cpu.solution.squeeze(-1).to(rhs.device, rhs.dtype)
    return out


def _solve_dense(matrix: Tensor, rhs: Tensor, ridge: float) -> Tensor:
    """Cholesky solve of the SPD system ``(S + ridge·I) x = rhs``, eigen/least-squares fallback."""
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    regularised = matrix + ridge * eye
    factor, info = torch.linalg.cholesky_ex(regularised)
    solution = torch.cholesky_solve(rhs.unsqueeze(-1), factor).squeeze(-1)
    bad = (info != 0) | ~torch.isfinite(solution).all(-1)
    if bad.any():  # (numerically) singular: minimum-norm solution
        solution = solution.clone()
        solution[bad] = _min_norm_solve(regularised[bad], rhs[bad])
    return solution


def _solve_cg(
    plan: Tensor,
    a: Tensor,
    b: Tensor,
    rhs: Tensor,
    ridge: float,
    max_iter: int,
    tol: float,
    start: Tensor | None = None,
) -> tuple[Tensor, bool]:
    """Jacobi-preconditioned conjugate gradients on ``(S + ridge·I) d_b = r`` over all ``n``
    column multipliers, matrix-free: ``S v = b ⊙ v − Pᵀ((P v) / a)`` costs two
    matrix-vector products (O(n²)), never the O(n³) product ``S`` itself.

    ``S`` is singular along ``1`` (the gauge ``d_a + c, d_b − c``, which leaves ``∂L/∂X``
    unchanged) and ``r ⊥ 1``, so no multiplier is pinned: pinning one would leave an
    eigenvalue ~``1/n`` and ~``√n`` iterations, where the other eigenvalues ``1 − σ_k(P)²``
    of a diffuse plan are near 1 and a few iterations suffice. Starts from ``start`` (the
    previous solve's) when given; stops at ``‖r − S d_b‖ ≤ tol·‖r‖``. Returns the solution
    and whether every system reached the tolerance.
    """
    n = plan.shape[-1]
    batch = plan.shape[:-2]
    plan = plan.reshape(-1, n, n)
    plan_t = plan.transpose(-1, -2)
    inverse_a = a.reshape(-1, n, 1).reciprocal()
    b = b.reshape(-1, n, 1)

    def apply(v: Tensor) -> Tensor:  # (m, n, 1) → (S + ridge·I) v
        moved = torch.bmm(plan, v).mul_(inverse_a)
        return torch.baddbmm(b * v, plan_t, moved, alpha=-1).add_(v, alpha=ridge)

    target = rhs.reshape(-1, n, 1)
    target = target - target.mean(-2, keepdim=True)  # exactly ⊥ 1, as it is up to round-off
    # Jacobi: diag S = b_j − Σ_i P_ij² / a_i, with a_i ≈ 1 (a reduction, no n × n temporary)
    squares = torch.linalg.vecdot(plan, plan, dim=-2).unsqueeze(-1)
    tiny = torch.finfo(rhs.dtype).tiny
    preconditioner = (b - squares + ridge).clamp_min(tiny).reciprocal_()
    if start is None:
        x, r = torch.zeros_like(target), target.clone()
    else:
        x = start.reshape(-1, n, 1).clone()
        r = target - apply(x)
    z = preconditioner * r
    p = z.clone()
    rz = torch.linalg.vecdot(r, z, dim=-2)
    threshold = (tol**2) * torch.linalg.vecdot(target, target, dim=-2).clamp_min(tiny)
    converged = False
    for step_count in range(max_iter + 1):
        converged = bool((torch.linalg.vecdot(r, r, dim=-2) <= threshold).all())
        if converged or step_count == max_iter:
            break
        ap = apply(p)
        step = (rz / torch.linalg.vecdot(p, ap, dim=-2).clamp_min(tiny)).unsqueeze(-1)
        x.addcmul_(step, p)
        r.addcmul_(step, ap, value=-1)
        z = preconditioner * r
        rz_new = torch.linalg.vecdot(r, z, dim=-2)
        p.mul_((rz_new / rz.clamp_min(tiny)).unsqueeze(-1)).add_(z)
        rz = rz_new
    return x.reshape(*batch, n), converged


def _solve_full(plan: Tensor, t_a: Tensor, t_b: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """The reference: the whole ``(2n−1)×(2n−1)`` system ``K d = t``, solved densely."""
    n = plan.shape[-1]
    top = torch.cat([torch.diag_embed(plan.sum(-1)), plan], dim=-1)
    bottom = torch.cat([plan.transpose(-1, -2), torch.diag_embed(plan.sum(-2))], dim=-1)
    kkt = torch.cat([top, bottom], dim=-2)[..., :-1, :-1]
    rhs = torch.cat([t_a, t_b[..., :-1]], dim=-1)
    solution = _solve_dense(kkt, rhs, ridge)
    d_b = torch.cat([solution[..., n:], torch.zeros_like(solution[..., :1])], dim=-1)
    return solution[..., :n], d_b


@dataclass(frozen=True)
class _Settings:
    """The solver's settings as one forward and its backward use them."""

    tau: float
    n_iter: int
    linear_solver: str
    ridge: float
    cg_max_iter: int
    cg_tol: float
    threshold: float | None
    check_every: int


def _forward_plan(logits: Tensor, settings: _Settings, span: _Range, warm: WarmStart | None) -> Tensor:
    """The plan in the work dtype (matrix scaling, else the log domain), from ``warm``'s
    potentials when it has them; writes the new potentials back to ``warm``."""
    work = logits.detach().to(span.work_dtype)
    init = None if warm is None else warm.start(work[..., 0, :], "potentials")
    every = 1 if init is not None else settings.check_every  # a warm start is a few iterations
    tau, high = settings.tau, span.high
    scaling = _scaling_sinkhorn(
        work, settings.n_iter, settings.threshold, span.peak, tau=tau, high=high, init=init, check_every=every
    )
    if scaling is not None:
        plan, potentials = scaling
    else:
        scaled = work / tau
        start = scaled if init is None else scaled + init.unsqueeze(-2)
        log_plan = _log_sinkhorn(start, settings.n_iter, settings.threshold, every)
        plan, potentials = log_plan.exp(), log_plan[..., 0, :] - scaled[..., 0, :]
    if warm is not None:
        warm.potentials = potentials
    return plan


def _column_multipliers(
    plan: Tensor, t_a: Tensor, t_b: Tensor, settings: _Settings, warm: WarmStart | None
) -> Tensor:
    """``d_b`` (any gauge): dense Schur on the first ``n−1`` (``"schur"``, ``d_b[n−1] = 0``),
    conjugate gradients on all ``n`` (``"cg"``), or (``"auto"``) conjugate gradients from the
    last solve for at most ``cg_max_iter`` steps and the dense solve only if they fall short."""
    a, b, rhs = _schur_rhs(plan, t_a, t_b)
    solver, n = settings.linear_solver, plan.shape[-1]
    if solver == "cg" or (solver == "auto" and n >= _AUTO_DENSE_BELOW):
        start = None if warm is None else warm.start(rhs, "solution")
        tol = max(settings.cg_tol, _CG_TOL_EPS * torch.finfo(plan.dtype).eps)
        d_b, converged = _solve_cg(plan, a, b, rhs, settings.ridge, settings.cg_max_iter, tol, start)
        if converged or solver == "cg":
            if warm is not None:
                warm.solution = d_b
            return d_b
    head = _solve_dense(_schur_matrix(plan, a, b), rhs[..., :-1], settings.ridge)
    return torch.nn.functional.pad(head, (0, 1))


_AUTO_DENSE_BELOW = 128  # "auto" solves smaller plans densely: O(n³) is then cheaper than a CG loop
_CG_TOL_EPS = 100  # conjugate gradients stop no closer than 100 ulps of the work dtype


class _ImplicitSinkhorn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, logits: Tensor, settings: _Settings, span: _Range, warm: WarmStart | None
    ) -> Tensor:
        with torch.no_grad():
            plan = _forward_plan(logits, settings, span, warm)
        ctx.save_for_backward(plan)  # kept in the work dtype: the solve below runs in it
        ctx.settings, ctx.warm = settings, warm
        return plan.to(logits.dtype)

    @staticmethod
    def backward(ctx: Any, grad_plan: Tensor) -> tuple[Tensor | None, ...]:
        (plan,) = ctx.saved_tensors
        settings: _Settings = ctx.settings
        out_dtype = grad_plan.dtype
        if plan.shape[-1] == 1:  # the only 1×1 plan is [[1]], whatever the logits
            return torch.zeros_like(grad_plan), None, None, None
        g_hat = grad_plan.to(plan.dtype) * plan  # a new tensor: the incoming gradient is never written
        t_a = g_hat.sum(-1)
        t_b = g_hat.sum(-2)
        if settings.linear_solver == "full":
            d_a, d_b = _solve_full(plan, t_a, t_b, settings.ridge)
        else:
            d_b = _column_multipliers(plan, t_a, t_b, settings, ctx.warm)
            d_a = (t_a - (plan @ d_b.unsqueeze(-1)).squeeze(-1)) / plan.sum(-1)
        # ∂L/∂X = (Ĝ − P ⊙ (d_a 1ᵀ + 1 d_bᵀ)) / τ, written into Ĝ's buffer
        grad = g_hat.addcmul_(plan, d_a.unsqueeze(-1), value=-1).addcmul_(plan, d_b.unsqueeze(-2), value=-1)
        if settings.tau != 1.0:
            grad.mul_(1.0 / settings.tau)
        return grad.to(out_dtype), None, None, None


def sinkhorn(
    logits: Tensor,
    tau: float = 1.0,
    n_iter: int = 20,
    *,
    backward: BackwardMode = "implicit",
    linear_solver: LinearSolver = "auto",
    ridge: float | None = None,
    cg_max_iter: int | None = None,
    cg_tol: float = 1e-10,
    threshold: float | None = None,
) -> Tensor:
    """Doubly-stochastic plan ``Sinkhorn(X / τ)`` for square logits ``(..., n, n)``.

    At most ``n_iter`` iterations; with a ``threshold``, fewer once the marginal error is
    below it (checked every 5 iterations).

    ``backward="implicit"`` differentiates the fixed point (memory independent of
    ``n_iter``; exact once the forward has converged, see :func:`marginal_error`);
    ``"unrolled"`` backpropagates through every iteration (the reference).
    Half/bfloat16 logits are computed (and differentiated) in float32, logits whose
    ``X / τ`` would overflow in float64; the plan has the logits' dtype.
    Raises ``ValueError`` for ``τ ≤ 0``, ``n_iter < 1``, non-finite logits, or
    ``X / τ`` overflowing even float64.
    """
    solver = Sinkhorn(
        tau,
        n_iter,
        backward=backward,
        linear_solver=linear_solver,
        ridge=ridge,
        cg_max_iter=cg_max_iter,
        cg_tol=cg_tol,
        threshold=threshold,
    )
    return solver(logits)


@dataclass(frozen=True)
class SinkhornOutput:
    """A plan and how far its forward got: ``balanced`` once ``marginal_error`` is within
    the solver's ``threshold`` (1e-3 when none is set); the implicit gradient is exact there."""

    plan: Tensor
    marginal_error: float
    balanced: bool

    @property
    def converged(self) -> bool:
        """Deprecated name of :attr:`balanced`."""
        warnings.warn(
            "SinkhornOutput.converged is deprecated; read balanced.", DeprecationWarning, stacklevel=2
        )
        return self.balanced


@dataclass(frozen=True)
class Sinkhorn:
    """A configured Sinkhorn solver, validated once: ``Sinkhorn(tau=0.5)(logits)`` returns
    the plan, ``.solve(logits)`` a :class:`SinkhornOutput`.

    Attributes mirror :func:`sinkhorn`'s parameters; ``threshold`` (optional) stops the
    forward early once the marginal error is below it.
    """

    tau: float = 1.0
    n_iter: int = 20
    backward: BackwardMode = "implicit"
    linear_solver: LinearSolver = "auto"
    ridge: float | None = None
    cg_max_iter: int | None = None
    cg_tol: float = 1e-10
    threshold: float | None = None

    def __post_init__(self) -> None:
        check_real("tau", self.tau, 0, strict=True)
        check_integer("n_iter", self.n_iter, 1)
        check_choice("backward", self.backward, ("implicit", "unrolled"))
        check_choice("linear_solver", self.linear_solver, ("auto", "schur", "cg", "full"))
        if self.ridge is not None:
            check_real("ridge", self.ridge, 0)
        check_integer("cg_max_iter", self.cg_max_iter, 1, optional=True)
        check_real("cg_tol", self.cg_tol, 0, strict=True)
        if self.threshold is not None:
            check_real("threshold", self.threshold, 0, strict=True)

    def __call__(self, logits: Tensor, warm_start: WarmStart | None = None) -> Tensor:
        """The plan ``Sinkhorn(X / τ)`` of square logits ``(..., n, n)`` (see :func:`sinkhorn`).

        ``warm_start`` (a :class:`WarmStart`, reused across calls) starts the forward from the
        previous call's potentials, checking the threshold every iteration, and the backward's
        conjugate gradients from its previous solution.
        """
        _check_shape(logits)
        tau, n_iter = float(self.tau), int(self.n_iter)
        span = _logit_range(logits, tau)
        if self.backward == "unrolled":
            return (
                _log_sinkhorn(logits.to(span.work_dtype) / tau, n_iter, self.threshold).exp().to(logits.dtype)
            )
        n = logits.shape[-1]
        settings = _Settings(
            tau=tau,
            n_iter=n_iter,
            linear_solver=self.linear_solver,
            ridge=_default_ridge(span.work_dtype) if self.ridge is None else float(self.ridge),
            cg_max_iter=int(self.cg_max_iter if self.cg_max_iter is not None else self._default_cg_iters(n)),
            cg_tol=float(self.cg_tol),
            threshold=self.threshold,
            check_every=_CHECK_EVERY,
        )
        return cast(Tensor, _ImplicitSinkhorn.apply(logits, settings, span, warm_start))

    def _default_cg_iters(self, n: int) -> int:
        """``2n`` for ``"cg"``; for ``"auto"``, ``max(16, n // 8)``, about where n steps of two
        matrix-vector products cost what the dense O(n³) solve does."""
        return max(16, n // 8) if self.linear_solver == "auto" else 2 * n

    def balanced(self, error: float) -> bool:
        """Whether a plan's marginal error is within ``threshold`` (1e-3 when none is set)."""
        return error <= (self.threshold or 1e-3)

    def solve(self, logits: Tensor, warm_start: WarmStart | None = None) -> SinkhornOutput:
        plan = self(logits, warm_start)
        error = marginal_error(plan)
        return SinkhornOutput(plan, error, self.balanced(error))


def marginal_error(plan: Tensor) -> float:
    """``max |P·1 − 1|, |Pᵀ·1 − 1|``: how far the forward is from converged."""
    with torch.no_grad():
        rows = (plan.sum(-1) - 1).abs().max()
        cols = (plan.sum(-2) - 1).abs().max()
        return float(torch.maximum(rows, cols))


def hard_permutation(logits: Tensor) -> Tensor:
    """Linear assignment maximising ``Σ_c X[c, idx[c]]``; returns ``idx`` (LongTensor).

    Batched logits ``(..., n, n)`` give indices of shape ``(..., n)``.
    """
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"hard_permutation expects square logits, got {tuple(logits.shape)}.")
    values = logits.detach().to("cpu", torch.float64)
    if not torch.isfinite(values).all():
        raise ValueError("hard_permutation: logits contain NaN or infinite values.")
    flat = values.reshape(-1, *values.shape[-2:]).numpy()
    out = np.empty(flat.shape[:2], dtype=np.int64)
    for k, matrix in enumerate(flat):
        rows, cols = linear_sum_assignment(matrix, maximize=True)
        out[k, rows] = cols
    return torch.from_numpy(out).reshape(values.shape[:-1]).to(logits.device)


def permutation_matrix(index: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The 0/1 matrix ``P`` with ``P[c, index[c]] = 1`` (so ``P @ x == x[index]``)."""
    n = index.shape[-1]
    eye = torch.eye(n, dtype=dtype, device=index.device)
    return eye[index]

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
``2n−1``), either densely (``"schur"``) or by conjugate gradients (``"cg"``); ``"full"``
solves the whole ``(2n−1)`` system (the reference). All add a
small ridge so that a saturated plan (``S → 0``) gives a finite (zero) gradient.
Memory is ``O(n²)`` whatever the iteration count.
"""

from __future__ import annotations

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
    "hard_permutation",
    "marginal_error",
    "permutation_matrix",
    "sinkhorn",
]

BackwardMode = Literal["implicit", "unrolled"]
LinearSolver = Literal["schur", "cg", "full"]


def _check_logits(logits: Tensor) -> None:
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"Sinkhorn expects square logits of shape (..., n, n), got {tuple(logits.shape)}.")
    if not logits.is_floating_point():
        raise ValueError(f"Sinkhorn logits must be floating point, got dtype {logits.dtype}.")
    if not torch.isfinite(logits).all():
        raise ValueError(
            "Sinkhorn logits contain NaN or infinite values; check the weights or the "
            "learning rate that produced them."
        )


def _work_dtype(logits: Tensor, tau: float) -> tuple[torch.dtype, float]:
    """The dtype Sinkhorn runs in (float32 for half/bfloat16, float64 if ``logits / τ`` would
    overflow) and ``max |X/τ|`` (one host sync, reused to choose matrix scaling).

    The log-domain iteration forms differences ``X_ij/τ − logsumexp``, so it needs
    ``max |X/τ|`` well below the dtype's largest value; raises ``ValueError`` otherwise.
    """
    dtype = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
    peak = float(logits.detach().abs().amax()) if logits.numel() else 0.0
    scaled = peak / tau  # a Python float: inf rather than an error on overflow
    for candidate in (dtype, torch.float64):
        if scaled <= torch.finfo(candidate).max / 8:
            return candidate, scaled
    raise ValueError(
        f"Sinkhorn: logits / tau overflows even in float64 (max |logits| = {peak:.3g}, tau = {tau:.3g}); "
        "use a larger tau or rescale the logits (e.g. logits / logits.abs().max())."
    )


_CHECK_EVERY = 5  # iterations between two marginal-error checks (each one a host sync)


def _row_error(log_s: Tensor) -> float:
    return float((torch.logsumexp(log_s, dim=-1).exp() - 1).abs().max())


def _log_sinkhorn(log_s: Tensor, n_iter: int, threshold: float | None = None) -> Tensor:
    """At most ``n_iter`` rounds of row then column normalisation in the log domain; with a
    ``threshold``, fewer once the row marginals are within it (columns are exact)."""
    for i in range(n_iter):
        log_s = log_s - torch.logsumexp(log_s, dim=-1, keepdim=True)
        log_s = log_s - torch.logsumexp(log_s, dim=-2, keepdim=True)
        if threshold is not None and (i + 1) % _CHECK_EVERY == 0 and _row_error(log_s) <= threshold:
            break
    return log_s


_EXP_RANGE = {torch.float32: 60.0, torch.float64: 600.0}  # e^range: far from overflow


def _scaling_sinkhorn(
    scaled: Tensor, n_iter: int, threshold: float | None = None, peak: float | None = None
) -> Tensor | None:
    """The same iterates as :func:`_log_sinkhorn`, as matrix scaling: ``P = diag(u) K diag(v)``
    with ``K = exp(X/τ − max)``, ``u = 1 / (K v)``, ``v = 1 / (Kᵀ u)``. Matrix-vector
    products instead of a logsumexp over the matrix per half-iteration; used when the
    range of ``X/τ`` keeps ``u`` and ``v`` finite, else None (the log domain is used).
    A known ``peak = max |X/τ|`` bounds the range by ``2·peak`` without another reduction."""
    limit = _EXP_RANGE.get(scaled.dtype)
    if limit is None or scaled.numel() == 0:
        return None
    top = scaled.amax(dim=(-2, -1), keepdim=True)
    if peak is None:
        peak = float((top - scaled.amin(dim=(-2, -1), keepdim=True)).max()) / 2
    if 2 * peak > limit:
        return None
    kernel = torch.exp(scaled - top)
    v = torch.ones(scaled.shape[:-1], dtype=scaled.dtype, device=scaled.device)
    for i in range(n_iter):
        u = 1.0 / (kernel @ v.unsqueeze(-1)).squeeze(-1)
        v = 1.0 / (kernel.transpose(-1, -2) @ u.unsqueeze(-1)).squeeze(-1)
        if threshold is not None and (i + 1) % _CHECK_EVERY == 0:
            rows = u * (kernel @ v.unsqueeze(-1)).squeeze(-1)
            if float((rows - 1).abs().max()) <= threshold:
                break
    return u.unsqueeze(-1) * kernel * v.unsqueeze(-2)


def _default_ridge(dtype: torch.dtype) -> float:
    return 100.0 * torch.finfo(dtype).eps


def _schur_system(plan: Tensor, t_a: Tensor, t_b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Reduce ``K d = t`` to ``S d_b = r`` on the first ``n−1`` column multipliers."""
    a = plan.sum(-1)  # (..., n)
    b = plan.sum(-2)
    p_over_a = plan / a.unsqueeze(-1)
    schur = torch.diag_embed(b) - plan.transpose(-1, -2) @ p_over_a
    rhs = t_b - (p_over_a.transpose(-1, -2) @ t_a.unsqueeze(-1)).squeeze(-1)
    return schur[..., :-1, :-1], rhs[..., :-1], a


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


def _solve_cg(matrix: Tensor, rhs: Tensor, ridge: float, max_iter: int, tol: float) -> Tensor:
    """Batched conjugate gradients on the SPD system ``(S + ridge·I) x = rhs``."""

    def apply(v: Tensor) -> Tensor:
        return (matrix @ v.unsqueeze(-1)).squeeze(-1) + ridge * v

    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rs = (r * r).sum(-1, keepdim=True)
    threshold = (tol**2) * (rhs * rhs).sum(-1, keepdim=True).clamp_min(torch.finfo(rhs.dtype).tiny)
    for _ in range(max_iter):
        if bool((rs <= threshold).all()):
            break
        ap = apply(p)
        denom = (p * ap).sum(-1, keepdim=True)
        step = torch.where(denom > 0, rs / denom.clamp_min(torch.finfo(rhs.dtype).tiny), 0.0)
        x = x + step * p
        r = r - step * ap
        rs_new = (r * r).sum(-1, keepdim=True)
        p = r + (rs_new / rs.clamp_min(torch.finfo(rhs.dtype).tiny)) * p
        rs = rs_new
    return x


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


class _ImplicitSinkhorn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        logits: Tensor,
        tau: float,
        n_iter: int,
        solver: str,
        ridge: float,
        cg_max_iter: int,
        cg_tol: float,
        work_dtype: torch.dtype,
        threshold: float | None,
        peak: float,
    ) -> Tensor:
        with torch.no_grad():
            scaled = logits.to(work_dtype) / tau
            plan = _scaling_sinkhorn(scaled, n_iter, threshold, peak)
            if plan is None:
                plan = _log_sinkhorn(scaled, n_iter, threshold).exp()
        ctx.save_for_backward(plan)  # kept in the work dtype: the solve below runs in it
        ctx.settings = (tau, solver, ridge, cg_max_iter, cg_tol)
        return plan.to(logits.dtype)

    @staticmethod
    def backward(ctx: Any, grad_plan: Tensor) -> tuple[Tensor | None, ...]:
        (plan,) = ctx.saved_tensors
        tau, solver, ridge, cg_max_iter, cg_tol = ctx.settings
        out_dtype, none = grad_plan.dtype, (None,) * 9
        if plan.shape[-1] == 1:  # the only 1×1 plan is [[1]], whatever the logits
            return torch.zeros_like(grad_plan), *none
        g_hat = grad_plan.to(plan.dtype) * plan  # a new tensor: the incoming gradient is never written
        t_a = g_hat.sum(-1)
        t_b = g_hat.sum(-2)
        if solver == "full":
            d_a, d_b = _solve_full(plan, t_a, t_b, ridge)
        else:
            schur, rhs, a = _schur_system(plan, t_a, t_b)
            if solver == "cg":
                d_b_head = _solve_cg(schur, rhs, ridge, cg_max_iter, cg_tol)
            else:
                d_b_head = _solve_dense(schur, rhs, ridge)
            d_b = torch.cat([d_b_head, torch.zeros_like(d_b_head[..., :1])], dim=-1)
            d_a = (t_a - (plan @ d_b.unsqueeze(-1)).squeeze(-1)) / a
        grad_logits = (g_hat - plan * (d_a.unsqueeze(-1) + d_b.unsqueeze(-2))) / tau
        return grad_logits.to(out_dtype), *none


def sinkhorn(
    logits: Tensor,
    tau: float = 1.0,
    n_iter: int = 20,
    *,
    backward: BackwardMode = "implicit",
    linear_solver: LinearSolver = "schur",
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
    linear_solver: LinearSolver = "schur"
    ridge: float | None = None
    cg_max_iter: int | None = None
    cg_tol: float = 1e-10
    threshold: float | None = None

    def __post_init__(self) -> None:
        check_real("tau", self.tau, 0, strict=True)
        check_integer("n_iter", self.n_iter, 1)
        check_choice("backward", self.backward, ("implicit", "unrolled"))
        check_choice("linear_solver", self.linear_solver, ("schur", "cg", "full"))
        if self.ridge is not None:
            check_real("ridge", self.ridge, 0)
        check_integer("cg_max_iter", self.cg_max_iter, 1, optional=True)
        check_real("cg_tol", self.cg_tol, 0, strict=True)
        if self.threshold is not None:
            check_real("threshold", self.threshold, 0, strict=True)

    def __call__(self, logits: Tensor) -> Tensor:
        """The plan ``Sinkhorn(X / τ)`` of square logits ``(..., n, n)`` (see :func:`sinkhorn`)."""
        _check_logits(logits)
        tau, n_iter = float(self.tau), int(self.n_iter)
        work_dtype, peak = _work_dtype(logits, tau)
        if self.backward == "unrolled":
            return _log_sinkhorn(logits.to(work_dtype) / tau, n_iter, self.threshold).exp().to(logits.dtype)
        n = logits.shape[-1]
        ridge = _default_ridge(work_dtype) if self.ridge is None else float(self.ridge)
        cg_iters = self.cg_max_iter if self.cg_max_iter is not None else 2 * n
        return cast(
            Tensor,
            _ImplicitSinkhorn.apply(
                logits,
                tau,
                n_iter,
                self.linear_solver,
                ridge,
                int(cg_iters),
                float(self.cg_tol),
                work_dtype,
                self.threshold,
                peak,
            ),
        )

    def balanced(self, error: float) -> bool:
        """Whether a plan's marginal error is within ``threshold`` (1e-3 when none is set)."""
        return error <= (self.threshold or 1e-3)

    def solve(self, logits: Tensor) -> SinkhornOutput:
        plan = self(logits)
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

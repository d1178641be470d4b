"""Linear algebra on trees: the solvers behind implicit (AID) and Krylov hypergradients.

All solvers take ``matvec(v) -> A v`` (a Hessian-vector oracle) and never form A.
Convergence tests that need a number on the host (CG's tolerance) are the only host syncs,
and they are skipped when the tolerance is 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from bilevel import tree as tr
from bilevel.tree import Tree

MatVec = Callable[[Tree], Tree]
_EPS = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}
_TINY = {dtype: torch.finfo(dtype).tiny for dtype in _EPS}


@dataclass
class SolveInfo:
    """What a solver did: iterations run and the final residual norm ‖A v − b‖ (a tensor)."""

    iterations: int
    residual: Tensor | None


def conjugate_gradient(
    matvec: MatVec,
    b: Tree,
    x0: Tree | None = None,
    maxiter: int = 100,
    tol: float = 1e-10,
) -> tuple[Tree, SolveInfo]:
    """Solve A v = b for symmetric positive definite A by conjugate gradients.

    Stops after ``maxiter`` iterations or when ‖r‖ ≤ tol·‖b‖ (tol = 0: exactly ``maxiter``
    iterations, no host sync). A warm start ``x0`` costs one extra matvec. The returned
    residual is the recursively updated one (no extra matvec). A search direction with
    (numerically) non-positive curvature pᵀAp ≤ ε‖p‖² takes no step, so a singular or
    indefinite A gives a finite, if inexact, answer rather than NaN.
    """
    if maxiter < 0:
        raise ValueError(f"maxiter must be >= 0, got {maxiter}")
    if x0 is None:
        x, r = tr.zeros_like(b), dict(b)
    else:
        x, r = x0, tr.sub(b, matvec(x0))
    p = r
    rr = tr.dot(r, r)
    threshold = (tol * tr.norm(b)) ** 2 if tol > 0 else None
    it = 0
    while it < maxiter:
        if threshold is not None and bool(rr <= threshold):
            break
        ap = matvec(p)
        pap = tr.dot(p, ap)
        # breakdown guard without a host sync: a direction of (numerically) zero or negative
        # curvature takes no step (A singular or indefinite along p) instead of a huge one
        curved = pap > _EPS[pap.dtype] * tr.dot(p, p)
        alpha = torch.where(curved, rr / pap, 0.0)  # the unselected rr / pap may be inf
        x = tr.axpy(alpha, p, x)
        r = tr.axpy(-alpha, ap, r)
        rr_new = tr.dot(r, r)
        beta = rr_new / rr.clamp_min(_TINY[rr.dtype])  # r = 0 exactly: r stays 0, beta 0
        p = tr.axpy(beta, p, r)
        rr = rr_new
        it += 1
    return x, SolveInfo(iterations=it, residual=torch.sqrt(rr))


def neumann(matvec: MatVec, b: Tree, lr: float, terms: int) -> tuple[Tree, SolveInfo]:
    """v = lr · Σ_{j<terms} (I − lr·A)^j b, the truncated Neumann series for A⁻¹ b.

    Converges when lr < 2/L (L the largest eigenvalue of A). Uses ``terms − 1`` matvecs.
    """
    if terms < 1:
        raise ValueError(f"the Neumann series needs at least one term, got {terms}")
    p = b
    total = b
    for _ in range(terms - 1):
        p = tr.axpy(-lr, matvec(p), p)
        total = tr.add(total, p)
    return tr.scale(total, lr), SolveInfo(iterations=terms - 1, residual=None)


def fixed_point(
    matvec: MatVec, b: Tree, x0: Tree | None, lr: float, iters: int
) -> tuple[Tree, SolveInfo]:
    """Iterate v ← v − lr·(A v − b) ``iters`` times (gradient descent on ½vᵀAv − bᵀv)."""
    v = tr.zeros_like(b) if x0 is None else x0
    for _ in range(iters):
        v = tr.axpy(-lr, tr.sub(matvec(v), b), v)
    return v, SolveInfo(iterations=iters, residual=None)


def lanczos_step(
    matvec: MatVec, q: Tree, q_prev: Tree | None, beta: Tensor
) -> tuple[Tensor, Tensor, Tree]:
    """One Lanczos step: given unit q, the previous vector and β, return (α, β_next, q_next).

    u = A q − β q_prev, α = qᵀu, ω = u − α q, β_next = ‖ω‖, q_next = ω / β_next.
    When β_next is 0 (breakdown: the Krylov space is invariant) q_next is zero; the caller
    decides to restart.
    """
    u = matvec(q)
    if q_prev is not None:
        u = tr.axpy(-beta, q_prev, u)
    alpha = tr.dot(q, u)
    omega = tr.axpy(-alpha, q, u)
    beta_next = tr.norm(omega)
    safe = torch.where(beta_next > 0, beta_next, torch.ones_like(beta_next))
    q_next = tr.scale(omega, torch.where(beta_next > 0, 1.0 / safe, torch.zeros_like(safe)))
    return alpha, beta_next, q_next


def tridiagonal_solve(diag: Tensor, off: Tensor, rhs: Tensor) -> Tensor:
    """Solve T s = rhs for symmetric tridiagonal T (diagonal ``diag`` [j], off-diagonal ``off``
    [j−1]) by the Thomas algorithm, O(j). Raises ``ValueError`` on a zero pivot (T singular or
    indefinite enough to break elimination without pivoting)."""
    n = diag.shape[0]
    if off.shape[0] != max(n - 1, 0) or rhs.shape[0] != n:
        raise ValueError(
            f"tridiagonal_solve: diag has {n} entries, off {off.shape[0]} (need {n - 1}), "
            f"rhs {rhs.shape[0]}"
        )
    c = [torch.zeros((), dtype=diag.dtype, device=diag.device)] * n
    d = [rhs[0]] * n
    pivot = diag[0]
    if bool(pivot == 0):
        raise ValueError("tridiagonal_solve: zero pivot (matrix singular)")
    c[0] = off[0] / pivot if n > 1 else c[0]
    d[0] = rhs[0] / pivot
    for i in range(1, n):
        pivot = diag[i] - off[i - 1] * c[i - 1]
        if bool(pivot == 0):
            raise ValueError("tridiagonal_solve: zero pivot (matrix singular)")
        if i < n - 1:
            c[i] = off[i] / pivot
        d[i] = (rhs[i] - off[i - 1] * d[i - 1]) / pivot
    s = [d[-1]] * n
    for i in range(n - 2, -1, -1):
        s[i] = d[i] - c[i] * s[i + 1]
    return torch.stack(s)


def tridiagonal_ldl_solve(
    diag: Tensor, off: Tensor, rhs: Tensor, rtol: float | None = None
) -> tuple[Tensor, Tensor]:
    """Solve T s = rhs for symmetric tridiagonal T by its LDLᵀ factorisation, O(j), no host sync.

    Returns ``(s, positive)``: ``positive`` is a 0-dim bool tensor, true when every pivot of D
    exceeds ``rtol``·(max|diag| + 2·max|off|) (default rtol: the dtype's machine epsilon), i.e.
    T is numerically positive definite. A pivot that fails is replaced by that scale, so ``s``
    stays finite whatever T is; the caller decides, from ``positive``, whether to use it
    (Krylov methods fall back to a safe step instead of branching on the host).
    """
    n = diag.shape[0]
    if n < 1 or off.shape[0] != n - 1 or rhs.shape[0] != n:
        raise ValueError(
            f"tridiagonal_ldl_solve: diag has {n} entries (need >= 1), off {off.shape[0]} "
            f"(need {n - 1}), rhs {rhs.shape[0]}"
        )
    if rtol is None:
        rtol = torch.finfo(diag.dtype).eps
    scale = diag.abs().max() + (2 * off.abs().max() if n > 1 else 0.0)
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
    threshold = rtol * scale
    positive = torch.isfinite(diag).all() & torch.isfinite(off).all()
    pivots, factors = [], []  # D and the sub-diagonal of the unit lower bidiagonal L
    for i in range(n):
        pivot = diag[i] if i == 0 else diag[i] - off[i - 1] * factors[i - 1]
        good = pivot > threshold
        positive = positive & good
        pivot = torch.where(good, pivot, scale)
        pivots.append(pivot)
        if i < n - 1:
            factors.append(off[i] / pivot)
    z = [rhs[0]]  # L z = rhs
    for i in range(1, n):
        z.append(rhs[i] - factors[i - 1] * z[i - 1])
    s = [z[-1] / pivots[-1]]  # D Lᵀ s = z, from the bottom
    for i in range(n - 2, -1, -1):
        s.append(z[i] / pivots[i] - factors[i] * s[-1])
    return torch.stack(s[::-1]), positive


def projected_solve(
    diag: Tensor, off: Tensor, rhs: Tensor, dense_up_to: int = 64
) -> tuple[Tensor, Tensor]:
    """:func:`tridiagonal_ldl_solve`'s contract, fastest way: up to ``dense_up_to`` rows a dense
    Cholesky (one library call: the O(j) LDLᵀ loop issues ~6j tiny tensor operations, slower
    than O(j³) flops at these sizes), above it the O(j) LDLᵀ loop. No host sync either way;
    ``positive`` uses the same pivot test (Cholesky's squared diagonal is LDLᵀ's D)."""
    n = diag.shape[0]
    if n > dense_up_to or off.shape[0] != n - 1 or rhs.shape[0] != n:
        return tridiagonal_ldl_solve(diag, off, rhs)
    dense = torch.diag(diag) + torch.diag(off, 1) + torch.diag(off, -1)
    factor, info = torch.linalg.cholesky_ex(dense)
    scale = diag.abs().max() + (2 * off.abs().max() if n > 1 else 0.0)
    pivots = torch.diagonal(factor) ** 2
    positive = (
        (info == 0)
        & torch.isfinite(pivots).all()
        & (pivots > torch.finfo(diag.dtype).eps * scale).all()
    )
    safe = torch.where(positive, factor, torch.eye(n, dtype=diag.dtype, device=diag.device))
    s = torch.cholesky_solve(rhs.unsqueeze(1), safe).squeeze(1)
    return s, positive

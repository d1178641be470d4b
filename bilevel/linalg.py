"""Linear algebra on trees: the solvers behind implicit (AID) and Krylov hypergradients.

All solvers take ``matvec(v) -> A v`` (a Hessian-vector oracle) and never form A.
Convergence tests that need a number on the host (CG's tolerance) are the only host syncs,
and they are skipped when the tolerance is 0 — unless CG is asked for ``host_scalars``, which
the AID methods do on the CPU, where a read costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from bilevel import tree as tr
from bilevel.tree import Tree

MatVec = Callable[[Tree], Tree]
_EPS = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@dataclass
class SolveInfo:
    """What a solver did: iterations run and the residual norm ‖A v − b‖ (a tensor; see each
    solver for which iterate it measures). CG adds its guard counters (0-dim int64 tensors;
    ints with ``host_scalars`` and where the solve cannot count anything: no warm start to
    drop, no ``fallback_lr``): ``negative_curvature`` (directions with pᵀAp ≤ ε‖r‖²: no step, the
    recurrence restarted), ``restarts`` (those, plus 1 when the solve ended 10× above its
    start's residual and returned the start), ``warm_start_dropped`` (1 when the warm start
    did not lower the residual) and ``fallbacks`` (1 when a solve from 0 made no progress and
    returned the bounded steepest-descent step instead). The stationary iterations (Neumann,
    fixed point) set ``diverged`` (a 0-dim bool): the residual ended 10× above ‖b‖, which a
    step below 2/λ_max never does on a positive semi-definite A (each iteration multiplies the
    residual by I − lr·A)."""

    iterations: int
    residual: Tensor | None
    negative_curvature: Tensor | int | None = None
    restarts: Tensor | int | None = None
    warm_start_dropped: Tensor | int | None = None
    fallbacks: Tensor | int | None = None
    diverged: Tensor | None = None


def on_cpu(b: Tree) -> bool:
    """Whether ``b`` lives on the CPU, where a solver's scalars are free to read
    (:func:`conjugate_gradient`'s ``host_scalars``)."""
    return tr.device(b).type == "cpu"


def damped(matvec: MatVec, rho: float) -> MatVec:
    """v ↦ (A + ρI) v: the ridge-damped operator (``matvec`` itself when ρ = 0)."""
    if rho == 0:
        return matvec
    return lambda v: tr.axpy(rho, v, matvec(v))


# a CG solve that ends with its residual this many times above its start returns the start;
# a Neumann / fixed-point residual this many times above ‖b‖ marks the iteration diverged
_GROWTH = 10.0


def conjugate_gradient(
    matvec: MatVec,
    b: Tree,
    x0: Tree | None = None,
    maxiter: int = 100,
    tol: float = 1e-10,
    fallback_lr: float | None = None,
    host_scalars: bool = False,
) -> tuple[Tree, SolveInfo]:
    """Solve A v = b for symmetric A by curvature-aware conjugate gradients.

    Stops after ``maxiter`` iterations or when ‖r‖ ≤ tol·‖b‖ (tol = 0: exactly ``maxiter``
    iterations, no host sync). A warm start ``x0`` costs one extra matvec and is dropped (the
    solve starts from 0, counted in ``warm_start_dropped``) when ‖b − A x0‖ > ‖b‖: a start that
    does not lower the residual only carries an old, possibly growing, v forward. The returned
    residual is the recursively updated one (no extra matvec).

    Guards, without a host sync, for an indefinite or singular A such as a network's Hessian
    away from a minimum: a direction of (numerically) non-positive curvature pᵀAp ≤ ε‖r‖² —
    one whose step α = ‖r‖²/pᵀAp would be negative or above 1/ε (ε: ~ the dtype's precision)
    — takes no step and restarts the recurrence along the residual (steepest descent), counted
    in ``negative_curvature``; a solve that ends with its residual 10× above its start's
    returns its start instead, with the start's residual (a non-finite residual is returned
    as it is, and a non-finite iterate stays non-finite, for the caller to see).
    ``restarts`` counts both events. On a positive definite A neither fires and the iterates
    are plain CG's. A solve from 0 that
    makes no progress (no direction of positive curvature, or the start returned) would give
    v = 0 and silently drop the implicit term; with ``fallback_lr`` η it returns the bounded
    steepest-descent step v = η b instead (residual ‖b − η A b‖ from the first product, no
    extra matvec), counted in ``fallbacks``. Each update is one fused op per tensor, so the
    guarded iteration costs about as many operations as an unguarded one.

    ``host_scalars``: the step sizes, norms and guard tests are Python numbers, read from the
    two inner products of each iteration, instead of 0-dim tensors (the counters are then
    ints). For CPU tensors outside autograd and ``torch.func`` transforms, where a read costs
    nothing and a float operation ~40× less than a 0-dim tensor one: ~1 ms of the peer
    benchmark's 10-iteration solve (benchmarks/peers/README.md). The iterates are the same up
    to rounding (the scalars in float64).
    """
    if maxiter < 0:
        raise ValueError(f"maxiter must be >= 0, got {maxiter}")
    eps = _EPS[next(iter(b.values())).dtype]
    read = Tensor.item if host_scalars else _unread
    bb = read(tr.dot(b, b))
    dropped: Tensor | int = 0
    start_x: Tree | None = None  # None: the start is 0 (x is then built by the first step)
    zero_start: Tensor | bool = True
    if x0 is None:
        x, r, rr = None, dict(b), bb
    else:
        r0 = tr.sub(b, matvec(x0))
        rr0 = read(tr.dot(r0, r0))
        keep = rr0 <= bb
        if host_scalars:  # a dropped start is the zero start
            x = start_x = x0 if keep else None
            r, rr, dropped, zero_start = (r0, rr0, 0, False) if keep else (dict(b), bb, 1, True)
        else:
            x = start_x = tr.where(keep, x0, tr.zeros_like(b))
            r = tr.where(keep, r0, b)
            rr = torch.where(keep, rr0, bb)
            dropped = (~keep).to(torch.int64)
            zero_start = ~keep
    start_rr = rr
    ab = None  # A b: the first product of a solve from 0 (its first direction is b)
    p = r
    zero = None if host_scalars else torch.zeros_like(rr)  # the loop's torch.where: no scalar
    threshold = tol**2 * bb if tol > 0 else None
    curvature: list[Tensor | bool] = []
    while len(curvature) < maxiter:
        if threshold is not None and bool(rr <= threshold):
            break
        ap = matvec(p)
        if ab is None:
            ab = ap
        pap = read(tr.dot(p, ap))
        curved = pap > eps * rr  # α = rr / pap in (0, 1/ε)
        alpha = _quotient_where(curved, rr, pap, zero)
        x = tr.scale(p, alpha) if x is None else tr.axpy(alpha, p, x)
        r = tr.axpy(alpha, ap, r, sign=-1.0)
        rr_new = read(tr.dot(r, r))
        # 0: restart along r. rr > 0 whenever curved (rr = 0 makes p = 0, of curvature 0),
        # so the unselected ratio is the only one that can divide by 0
        beta = _quotient_where(curved, rr_new, rr, zero)
        p = tr.axpy(beta, p, r)
        rr = rr_new
        curvature.append(curved)
    if x is None:
        x = tr.zeros_like(b)
    if host_scalars:
        return _end_on_host(x, start_x, b, ab, rr, start_rr, curvature, zero_start,
                            dropped, fallback_lr)  # fmt: skip
    negative = (
        (~torch.stack(curvature)).sum() if curvature else torch.zeros_like(bb, dtype=torch.int64)
    )
    kept = rr <= _GROWTH**2 * start_rr  # False for NaN: a NaN residual grew too
    grew = ~kept
    x = _towards_start(x, start_x, kept.to(rr.dtype))
    # a non-finite residual is kept: a NaN product must not pass unseen behind the start
    rr = torch.where(grew & torch.isfinite(rr), start_rr, rr)
    fell_back: Tensor | int = 0
    if fallback_lr is not None and ab is not None:
        made_no_progress = grew | (negative == len(curvature))  # no step of positive curvature
        stalled = made_no_progress & torch.isfinite(rr)  # a NaN stays seen
        if zero_start is not True:
            stalled = stalled & zero_start
        # a stalled solve's x is its start, 0: the fallback step is x + η b
        x = tr.axpy(stalled.to(rr.dtype) * fallback_lr, b, x)
        r_fallback = tr.axpy(-fallback_lr, ab, b)
        rr = torch.where(stalled, tr.dot(r_fallback, r_fallback), rr)
        fell_back = stalled.to(torch.int64)
    info = SolveInfo(len(curvature), torch.sqrt(rr), negative, negative + grew, dropped, fell_back)
    return x, info


def _end_on_host(
    x: Tree,
    start_x: Tree | None,
    b: Tree,
    ab: Tree | None,
    rr: float,
    start_rr: float,
    curvature: list[bool],
    zero_start: bool,
    dropped: int,
    fallback_lr: float | None,
) -> tuple[Tree, SolveInfo]:
    """:func:`conjugate_gradient`'s end with host scalars: the same guards as its tensor
    path, branching where that one selects."""
    negative = curvature.count(False)
    grew = not rr <= _GROWTH**2 * start_rr  # True for NaN
    if grew:
        x = _towards_start(x, start_x, 0.0)
        if math.isfinite(rr):
            rr = start_rr
    fell_back = 0
    made_no_progress = grew or negative == len(curvature)  # no step of positive curvature
    # a stalled solve from 0 (its x is 0) takes the fallback step; a NaN stays seen
    stalled = made_no_progress and zero_start and math.isfinite(rr)
    if fallback_lr is not None and ab is not None and stalled:
        x = tr.axpy(fallback_lr, b, x)
        r_fallback = tr.axpy(-fallback_lr, ab, b)
        rr, fell_back = tr.dot(r_fallback, r_fallback).item(), 1
    like = next(iter(b.values()))
    residual = torch.tensor(math.sqrt(rr), dtype=like.dtype, device=like.device)
    return x, SolveInfo(len(curvature), residual, negative, negative + grew, dropped, fell_back)


def _unread(t: Tensor) -> Tensor:
    """A scalar left on its device (no host sync)."""
    return t


def _quotient_where(
    cond: Tensor | bool, num: Tensor | float, den: Tensor | float, zero: Tensor | None
) -> Tensor | float:
    """num / den where ``cond`` holds, else 0: Python numbers, or 0-dim tensors selected
    without a host sync (the unselected quotient may then be inf or NaN)."""
    if isinstance(cond, bool):
        return num / den if cond else 0.0
    return torch.where(cond, num / den, zero)


def _towards_start(x: Tree, start_x: Tree | None, weight: Tensor | float) -> Tree:
    """x at ``weight`` 1, the start (0 when ``start_x`` is None) at 0: exact at those weights,
    and a non-finite x stays non-finite."""
    return tr.scale(x, weight) if start_x is None else tr.lerp(start_x, x, weight)


def neumann(matvec: MatVec, b: Tree, lr: float, terms: int) -> tuple[Tree, SolveInfo]:
    """v = lr · Σ_{j<terms} (I − lr·A)^j b, the truncated Neumann series for A⁻¹ b.

    Converges when lr < 2/L (L the largest eigenvalue of A). Uses ``terms − 1`` matvecs. The
    residual is that of the series one term shorter, ‖(I − lr·A)^(terms−1) b‖ (the returned
    v's would cost one more matvec); ``diverged`` when it ends 10× above ‖b‖.
    """
    if terms < 1:
        raise ValueError(f"the Neumann series needs at least one term, got {terms}")
    p = b
    total = b
    for _ in range(terms - 1):
        p = tr.axpy(-lr, matvec(p), p)
        total = tr.add(total, p)
    pp = tr.dot(p, p)
    info = SolveInfo(terms - 1, torch.sqrt(pp), diverged=_diverged(pp, b))
    return tr.scale(total, lr), info


def fixed_point(
    matvec: MatVec, b: Tree, x0: Tree | None, lr: float, iters: int
) -> tuple[Tree, SolveInfo]:
    """Iterate v ← v − lr·(A v − b) ``iters`` times (gradient descent on ½vᵀAv − bᵀv).

    A warm start ``x0`` whose residual exceeds ‖b‖ is dropped (start from 0; free: the first
    iteration computes A x0 anyway). The residual is that of the last iterate the loop
    evaluated, one step before the returned v (‖b‖ when ``iters`` is 0); ``diverged`` when it
    ends 10× above ‖b‖.
    """
    v = tr.zeros_like(b) if x0 is None else x0
    r = None  # the last residual A v − b the loop evaluated
    dropped = None
    for it in range(iters):
        r = tr.sub(matvec(v), b)
        if it == 0 and x0 is not None:
            keep = tr.dot(r, r) <= tr.dot(b, b)
            dropped = (~keep).to(torch.int64)
            v, r = tr.where(keep, v, tr.zeros_like(b)), tr.where(keep, r, tr.scale(b, -1.0))
        v = tr.axpy(-lr, r, v)
    rr = tr.dot(b, b) if r is None else tr.dot(r, r)
    info = SolveInfo(iters, torch.sqrt(rr), warm_start_dropped=dropped, diverged=_diverged(rr, b))
    return v, info


def _diverged(residual_sq: Tensor, b: Tree) -> Tensor:
    """Whether a stationary iteration's residual (given squared: no square root) ended 10×
    above ‖b‖ (NaN counts)."""
    return ~(residual_sq <= _GROWTH**2 * tr.dot(b, b))


def largest_eigenvalue(matvec: MatVec, start: Tree, iters: int = 5) -> Tensor:
    """A cheap estimate of A's largest eigenvalue: ``iters`` power iterations from ``start``,
    then the Rayleigh quotient (a lower bound of λ_max; 0 for a zero start). ``iters``
    matvecs, no host sync."""
    v = start
    quotient = torch.zeros_like(tr.dot(start, start))
    for _ in range(iters):
        norm = tr.norm(v)
        safe = torch.where(norm > 0, norm, torch.ones_like(norm))
        v = tr.scale(v, 1.0 / safe)
        av = matvec(v)
        quotient = tr.dot(v, av)
        v = av
    return quotient


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

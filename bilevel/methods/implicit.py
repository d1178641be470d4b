"""Approximate implicit differentiation (AID).

At an inner solution y ≈ y*(x) the implicit function theorem gives

    ∇F(x) = ∇_x f − ∇²_xy g · v,   with  ∇²_yy g · v = ∇_y f,

so a method runs K warm-started inner steps, linearises ∇_y g once at (x, y_K), solves the
linear system for v with a solver from :mod:`bilevel.linalg` (warm-started v where the solver
allows), every HVP a pullback through that linearisation, and applies one mixed product
through the same linearisation.
Pedregosa, "Hyperparameter optimization with approximate gradient", ICML 2016 (CG);
Lorraine, Vicol, Duvenaud, "Optimizing Millions of Hyperparameters by Implicit
Differentiation", AISTATS 2020 (Neumann); Grazzi, Franceschi, Pontil, Salzo, "On the Iteration
Complexity of Hypergradient Computation", ICML 2020 (fixed point).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import Tensor

from bilevel import tree as tr
from bilevel.checks import check_int, check_nonnegative, check_positive
from bilevel.linalg import (
    MatVec,
    SolveInfo,
    conjugate_gradient,
    damped,
    fixed_point,
    largest_eigenvalue,
    neumann,
    on_cpu,
)
from bilevel.linearization import LowerLinearization
from bilevel.methods.base import Method, MethodState, register
from bilevel.oracles import STEP_SIZE
from bilevel.problem import Problem
from bilevel.tree import Tree

# Default ridge ρ of the damped system (∇²_yy g + ρI) v = ∇_y f: 0 keeps the hypergradient
# exact on convex lower problems; network tasks set it (measurements: docs/methods/krylov.md)
RIDGE = 0.0
# a v with ‖v‖ > V_BOUND·‖b‖/ρ is rejected: for a positive semi-definite Hessian ‖v‖ ≤ ‖b‖/ρ
V_BOUND = 100.0
# power iterations of the step-size check of neumann and fixed point
POWER_ITERS = 5


@dataclass
class ImplicitState(MethodState):
    """Adds the linear-system solution ``v`` (warm start for the next outer step) and
    ``checked``: the first step's one-off checks are done."""

    v: Tree | None = None
    checked: bool = False


def require_lower_reaches_x(problem: Problem, lin: LowerLinearization, method: str) -> None:
    """Raise when ∇_y g does not depend on x (structurally): the implicit hypergradient is then
    ∇_x f alone, and with ``init_lower`` (MAML) it ignores that the inner loop starts at x."""
    if lin.reaches_x():
        return
    start = (
        "the inner loop starts from init_lower(x), but the implicit hypergradient only sees "
        "the lower solution y*(x), not where it started: "
        if problem.init_lower is not None
        else ""
    )
    raise ValueError(
        f"{method}: the lower loss does not depend on x, so its implicit hypergradient is "
        f"∇_x f alone (zero if the upper loss ignores x too); {start}use 'itd' to "
        "differentiate through the inner steps, or add a proximal term λ/2‖y − x‖² to the "
        "lower loss (iMAML: the tasks' proximal=λ option)"
    )


def require_lower_reaches_x_once(
    problem: Problem, lin: LowerLinearization | None, state: ImplicitState, method: str
) -> None:
    """:func:`require_lower_reaches_x` at the first step only (``state.checked`` records it;
    ``lin`` is needed only then)."""
    if not state.checked:
        require_lower_reaches_x(problem, lin, method)
        state.checked = True


def check_step_size(matvec: MatVec, b: Tree, lr: float, method: str) -> None:
    """Warn when ``solver_lr`` ≥ 2/λ_max, λ_max estimated by a few power iterations from b
    (counted HVPs; one host read, once per run): the series / iteration then diverges."""
    lam = float(largest_eigenvalue(matvec, b, POWER_ITERS))
    if lam > 0 and lr >= 2.0 / lam:
        warnings.warn(
            f"{method}: solver_lr={lr:g} is at least 2/λ_max (λ_max ≈ {lam:.3g} by "
            f"{POWER_ITERS} power iterations on ∇²_yy g + ridge), so the linear solve diverges; "
            f"use solver_lr < {2.0 / lam:.3g}, or cg",
            RuntimeWarning,
            stacklevel=4,
        )


def record_solve(
    problem: Problem,
    state: MethodState,
    hg: Tree,
    v: Tree,
    b: Tree,
    ridge: float,
    info: SolveInfo | None = None,
    residual: Tensor | None = None,
) -> None:
    """Put the solve's ``residual`` and ``hypergradient_norm`` (and CG's guard counters,
    cumulative over the run: tensors, or 0 while nothing could be counted) in ``state.info``
    (no host sync), and flag a non-finite hypergradient, v or residual, a v beyond the bound
    V_BOUND·‖b‖/ρ, or a diverged stationary iteration for
    :meth:`~bilevel.Problem.raise_if_nonfinite`, which names the linear solve."""
    hg_norm = tr.norm(hg)
    vv = tr.dot(v, v)
    out = {} if info is None else {"solver_iterations": info.iterations}
    for key in ("negative_curvature", "restarts", "warm_start_dropped", "fallbacks"):
        value = None if info is None else getattr(info, key)
        if value is not None:
            out[key] = value + state.info.get(key, 0)
    residual = residual if info is None else info.residual
    out["hypergradient_norm"] = hg_norm
    if residual is None:
        problem.watch_solve(hg_norm, vv)  # non-finite: flagged
    else:
        out["residual"] = residual
        problem.watch_solve(hg_norm, vv, residual)
    if ridge > 0:
        problem.watch_solve(vv > (V_BOUND / ridge) ** 2 * tr.dot(b, b))
    if info is not None and info.diverged is not None:
        problem.watch_solve(info.diverged, flag=STEP_SIZE)
    state.info.update(out)


@dataclass(kw_only=True)
class Implicit(Method):
    """Shared AID step; subclasses choose the linear solver. ``solver_iters`` counts
    Hessian-vector products (J) for every solver.

    ``ridge`` ρ ≥ 0 solves the damped system (∇²_yy g + ρI) v = ∇_y f (a network's Hessian is
    indefinite away from a minimum; the damping adds no oracle call); ``solver_warm_start``
    starts the solve from the last step's v (default: as ``warm_start``; a start that does not
    lower the residual is dropped).
    """

    KEEPS_INNER_STATE = True
    # fewest HVPs a solve may take; a solver whose v starts at 0 sets 1 (with no product v
    # stays 0 and hg = ∇_x f, silently)
    MIN_SOLVER_ITERS = 0
    solver_iters: int = 20
    ridge: float = RIDGE
    solver_warm_start: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("solver_iters", self.solver_iters, self.MIN_SOLVER_ITERS)
        check_nonnegative("ridge", self.ridge)

    def init(self, problem: Problem, x: Tree, y: Tree | None) -> ImplicitState:
        base = super().init(problem, x, y)
        return ImplicitState(y=base.y, y0=base.y0)

    @property
    def warm_v(self) -> bool:
        """Whether the solve starts from the last step's v."""
        return self.warm_start if self.solver_warm_start is None else self.solver_warm_start

    def operator(self, lin: LowerLinearization) -> MatVec:
        """v ↦ (∇²_yy g + ρI) v through ``lin``."""
        return damped(lin.hvp, self.ridge)

    def solve(
        self, problem: Problem, x: Tree, y: Tree, b: Tree, v0: Tree | None, lin: LowerLinearization
    ) -> tuple[Tree, SolveInfo]:
        """v ≈ (∇²_yy g + ρI)⁻¹ b; ``lin`` is ∇_y g linearised at this step's lower batch."""
        raise NotImplementedError

    def first_step_checks(self, problem: Problem, b: Tree, lin: LowerLinearization) -> None:
        """One-off checks at the first step (subclasses add a step-size check)."""
        require_lower_reaches_x(problem, lin, self.name)

    def step(self, problem: Problem, x: Tree, state: ImplicitState) -> tuple[Tree, ImplicitState]:
        x = tr.detach(x)
        y = self.inner_loop(problem, x, state)
        gx, gy = problem.grad_upper(x, y, problem.upper_batch(), mode="autograd")
        # one linearisation of ∇_y g serves every HVP of the solve and the mixed product. A
        # NaN/Inf product reaches v, the residual or hg, which record_solve checks (naming the
        # linear solve, as their own watches would): the linearisation, the solve's J products
        # and the mixed product need no watch of their own
        with problem.unwatched():
            lin = problem.linearize_lower(x, y, problem.lower_batch())
            if not state.checked:
                self.first_step_checks(problem, gy, lin)
                state.checked = True
            v0 = state.v if self.warm_v else None
            v, info = self.solve(problem, x, y, gy, v0, lin)
            hg = tr.sub(gx, lin.mixed(v))
        state.y, state.v = y, v
        record_solve(problem, state, hg, v, gy, self.ridge, info)
        return hg, state


@register("cg")
@dataclass(kw_only=True)
class ConjugateGradient(Implicit):
    """AID with curvature-aware conjugate gradients on (∇²_yy g + ρI) v = ∇_y f.

    Stops at ``solver_iters`` iterations or relative residual ``solver_tol`` (0: no test, no
    host sync off the CPU; on the CPU, where a read is free, the solve keeps its scalars on
    the host, ``host_scalars`` of :func:`bilevel.linalg.conjugate_gradient`, and ``info``'s
    counters are ints). Non-positive curvature restarts the recurrence, and a solve ending 10×
    above its start's residual returns the start (counted in ``info``, see
    :func:`bilevel.linalg.conjugate_gradient`). A solve from 0 that makes no progress (on a
    network far from a minimum, ∇_y f itself can have non-positive curvature) would return
    v = 0, hg = ∇_x f, and freeze a deterministic run; it returns v = η ∇_y f instead, η =
    ``fallback_lr`` (default ``inner_lr``: with GD inner steps below 2/L this is
    back-propagation through the last inner step, Shaban et al., AISTATS 2019), counted in
    ``info["fallbacks"]``. Oracles: K inner gradients, 1 linearisation, J HVPs (+1 for the warm
    start), 1 mixed product.
    """

    MIN_SOLVER_ITERS = 1
    solver_tol: float = 1e-10
    fallback_lr: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_nonnegative("solver_tol", self.solver_tol)
        if self.fallback_lr is not None:
            check_positive("fallback_lr", self.fallback_lr)

    def solve(self, problem, x, y, b, v0, lin):
        fallback_lr = self.inner_lr if self.fallback_lr is None else self.fallback_lr
        return conjugate_gradient(self.operator(lin), b, v0, self.solver_iters, self.solver_tol,
                                  fallback_lr, host_scalars=on_cpu(b))  # fmt: skip


@register("neumann")
@dataclass(kw_only=True)
class NeumannSeries(Implicit):
    """AID with a truncated Neumann series v = η Σ_{j≤J} (I − ηA)^j ∇_y f (needs η < 2/L),
    A = ∇²_yy g + ρI.

    J = ``solver_iters`` HVPs, so the series has J + 1 terms (J = 0: v = η ∇_y f).
    ``solver_warm_start`` (default ``False``: the series restarts from ∇_y f, as Lorraine et al.
    wrote it) continues from the last step's v₀ instead: the series on the residual,
    v = v₀ + η Σ_{j<J} (I − ηA)^j (∇_y f − A v₀), J HVPs (one for A v₀) — which is fixed-point
    iteration from v₀, so it runs :func:`bilevel.linalg.fixed_point` (a v₀ that does not lower
    the residual is dropped). Over outer steps the terms accumulate, so directions of small
    curvature, which J terms from scratch leave short by a factor ~ηJλ, are resolved.
    The first step estimates λ_max by a few power iterations and warns when η ≥ 2/λ_max.
    Oracles: K inner gradients, 1 linearisation, J HVPs, 1 mixed product (+5 HVPs at the first
    step).
    """

    solver_lr: float = 0.1
    solver_warm_start: bool | None = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("solver_lr", self.solver_lr)
        if self.warm_v and self.solver_iters == 0:
            raise ValueError(
                "neumann: solver_warm_start needs solver_iters >= 1 (with no HVP the warm-started "
                "v would never move from the first step's)"
            )

    def first_step_checks(self, problem, b, lin):
        super().first_step_checks(problem, b, lin)
        check_step_size(self.operator(lin), b, self.solver_lr, self.name)

    def solve(self, problem, x, y, b, v0, lin):
        if v0 is not None:  # the series on the residual b − A v₀: fixed-point iteration
            return fixed_point(self.operator(lin), b, v0, self.solver_lr, self.solver_iters)
        # J HVPs: J + 1 terms
        return neumann(self.operator(lin), b, self.solver_lr, self.solver_iters + 1)


@register("fixed_point")
@dataclass(kw_only=True)
class FixedPoint(Implicit):
    """AID by fixed-point iteration v ← v − η(A v − ∇_y f), A = ∇²_yy g + ρI, warm-started
    (hypertorch's ``fixed_point``). The first step checks η against a power-iteration estimate
    of λ_max. Oracles: K inner gradients, 1 linearisation, J HVPs, 1 mixed product (+5 HVPs at
    the first step)."""

    MIN_SOLVER_ITERS = 1
    solver_lr: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("solver_lr", self.solver_lr)

    def first_step_checks(self, problem, b, lin):
        super().first_step_checks(problem, b, lin)
        check_step_size(self.operator(lin), b, self.solver_lr, self.name)

    def solve(self, problem, x, y, b, v0, lin):
        return fixed_point(self.operator(lin), b, v0, self.solver_lr, self.solver_iters)

"""Single-loop and stochastic hypergradient baselines: SOBA, stocBiO and AmIGO.

All three estimate ∇F(x) = ∇_x f − ∇²_xy g · v with v ≈ A⁻¹ b, A = ∇²_yy g and b = ∇_y f, and
carry y and v across outer steps (``state.y``, ``state.v``), so a residual diagnostic
‖A v − b‖ reads them like any implicit method's. With mini-batches (``lower_data`` /
``upper_data``) every Hessian-vector product of a linear solve and every mixed product draws a
fresh lower batch, so the estimates stay unbiased where the solver is linear in A (see each
class).

- Dagréou, Ablin, Vaiter, Moreau, "A framework for bilevel optimization that enables stochastic
  and global variance reduction algorithms", NeurIPS 2022 (SOBA).
- Ji, Yang, Liang, "Bilevel Optimization: Convergence Analysis and Enhanced Design", ICML 2021
  (stocBiO).
- Arbel, Mairal, "Amortized implicit differentiation for stochastic bilevel optimization",
  ICLR 2022 (AmIGO).
"""

from __future__ import annotations

from dataclasses import dataclass

from bilevel import tree as tr
from bilevel.checks import check_int, check_nonnegative, check_positive
from bilevel.inner import run_inner
from bilevel.linalg import MatVec, conjugate_gradient, damped, fixed_point, neumann, on_cpu
from bilevel.linearization import LowerLinearization
from bilevel.methods.base import Method, register
from bilevel.methods.implicit import (
    RIDGE,
    Implicit,
    ImplicitState,
    NeumannSeries,
    check_step_size,
    record_solve,
    require_lower_reaches_x_once,
)
from bilevel.problem import Problem
from bilevel.tree import Tree

SOLVERS = ("cg", "gd")


def fresh_batch_hvp(problem: Problem, x: Tree, y: Tree, lin: LowerLinearization) -> MatVec:
    """v ↦ ∇²_yy g(x, y; batch) · v on the next lower batch at every call (stochastic solvers).

    Without lower_data every call would see the same batch, so ``lin`` (the step's
    linearisation) answers them all."""
    if problem.lower_data is None:
        return lin.hvp
    return lambda v: problem.hvp_lower_yy(x, y, v, problem.lower_batch())


@register("soba")
@dataclass(kw_only=True)
class SOBA(Method):
    """SOBA: single-loop joint steps on y and on v (Dagréou et al., NeurIPS 2022).

    Each outer step evaluates, at the *current* iterates (yₜ, vₜ) as in the paper,

        b = ∇_y f(x, yₜ),   hg = ∇_x f(x, yₜ) − ∇²_xy g(x, yₜ) · vₜ,
        vₜ₊₁ = vₜ − η (∇²_yy g(x, yₜ) · vₜ − b),

    then moves y by ``inner_steps`` optimizer steps from yₜ. The returned estimate therefore uses
    the y and v *before* this step's updates (the first one, with v₀ = 0, is just ∇_x f);
    ``state.y``, ``state.v`` hold the updated iterates. η = ``solver_lr`` (stable for
    η < 2/L). With mini-batches each oracle call draws its own batch (the inner gradients, the
    HVP and the mixed product on separate lower batches; ∇_x f and ∇_y f share one upper batch,
    one reverse pass), so each estimate is unbiased given (yₜ, vₜ). ``ridge`` ρ adds ρvₜ to the
    HVP (the damped system, no oracle call).
    Oracles per step: K inner gradients (default K = 1), 1 upper gradient, 1 HVP, 1 mixed.
    """

    inner_steps: int = 1
    solver_lr: float = 0.1
    ridge: float = RIDGE

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("inner_steps", self.inner_steps, 1)
        check_positive("solver_lr", self.solver_lr)
        check_nonnegative("ridge", self.ridge)
        if self.warm_start is not True:
            raise ValueError(
                "soba is single-loop: y and v must carry over between outer steps "
                f"(warm_start=True), got warm_start={self.warm_start!r}"
            )

    def init(self, problem: Problem, x: Tree, y: Tree | None) -> ImplicitState:
        """y from the base (``init_lower`` only sets the first y: SOBA never restarts it), v = 0."""
        base = super().init(problem, x, y)
        return ImplicitState(y=base.y, y0=base.y0, v=tr.zeros_like(base.y))

    def step(self, problem: Problem, x: Tree, state: ImplicitState) -> tuple[Tree, ImplicitState]:
        x = tr.detach(x)
        y, v = state.y, state.v
        gx, gy = problem.grad_upper(x, y, problem.upper_batch(), mode="autograd")
        if problem.lower_data is None:  # one batch for both products: one linearisation
            lin = problem.linearize_lower(x, y, problem.lower_batch())
            hvp_of, mixed_of = lin.hvp, lin.mixed
        else:
            batch = problem.lower_batch()
            lin = None  # the first step's check needs a linearisation of its own
            if not state.checked:
                with problem.uncounted():
                    lin = problem.linearize_lower(x, y, batch)
            hvp_of = lambda u: problem.hvp_lower_yy(x, y, u, batch)  # noqa: E731
            mixed_of = lambda u: problem.mixed_lower_xy(x, y, u, problem.lower_batch())  # noqa: E731
        require_lower_reaches_x_once(problem, lin, state, self.name)
        hvp = damped(hvp_of, self.ridge)(v)
        mixed = mixed_of(v)
        residual = tr.sub(hvp, gy)  # A v − b: the v-direction and a free residual estimate
        hg = tr.sub(gx, mixed)
        state.v = tr.axpy(-self.solver_lr, residual, v)
        state.y = run_inner(problem, x, y, self.inner_steps, self.optimizer)
        record_solve(problem, state, hg, v, gy, self.ridge, residual=tr.norm(residual))
        return hg, state


@register("stocbio")
@dataclass(kw_only=True)
class StocBiO(NeumannSeries):
    """stocBiO: warm-started inner steps + a stochastic Neumann series (Ji, Yang, Liang, ICML 2021).

    v = η Σ_{j≤J} Π_{i≤j} (I − η Aᵢ) b with J = ``solver_iters`` HVPs, η = ``solver_lr``
    (needs η < 2/L) and every Aᵢ on a fresh lower batch; b = ∇_y f shares the upper batch of
    ∇_x f, and the mixed product takes another lower batch. The factors are independent, so
    for quadratics E[v] is the full-batch truncated series. Deterministic problems give
    exactly ``neumann``; the error then decays like (1 − ηµ)^(J+1). J counts HVPs, as for
    every method (the paper's Q); the series has J + 1 terms; v does not warm-start. ``ridge``
    and the first step's step-size check (5 power-iteration HVPs on the step's batch) as for
    ``neumann``. Oracles per step: K inner gradients, 1 upper gradient, J HVPs, 1 mixed.
    """

    solver_iters: int = 10

    def solve(self, problem, x, y, b, v0, lin):
        hvp = damped(fresh_batch_hvp(problem, x, y, lin), self.ridge)
        return neumann(hvp, b, self.solver_lr, self.solver_iters + 1)  # J HVPs: J + 1 terms


@register("amigo")
@dataclass(kw_only=True)
class AmIGO(Implicit):
    """AmIGO: warm-started inner steps + J warm-started solver steps on ½vᵀAv − bᵀv
    (Arbel & Mairal, ICLR 2022).

    ``solver="cg"`` (default, "AmIGO-CG" of the LancBiO paper): J = ``solver_iters``
    conjugate-gradient steps from the previous v, stopping early at relative residual
    ``solver_tol`` (0: never, no host sync off the CPU; scalars as for ``cg``); all J products
    use one lower batch (CG needs a fixed operator), so it is biased under noise and its error
    shrinks with the batch size.
    ``solver="gd"`` (the paper's stochastic solver): J steps v ← v − η(Aⱼ v − b) with
    η = ``solver_lr`` and a fresh lower batch per step (unbiased for quadratics given the
    start). ``solver_tol`` only concerns cg and ``solver_lr`` only gd: giving either to the
    other solver is an error (defaults 1e-10 and 0.1). The mixed product uses
    its own lower batch. ``ridge`` and CG's guards as for ``cg``; with gd the first step checks
    η by 5 power-iteration HVPs. Oracles per step: K inner gradients, 1 upper gradient, J HVPs
    (cg: one more for the warm start's residual once v exists), 1 mixed.
    """

    MIN_SOLVER_ITERS = 1  # v is only ever its warm start (0 at first) without an iteration

    solver: str = "cg"
    solver_iters: int = 5
    solver_tol: float | None = None
    solver_lr: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        unused = "solver_lr" if self.solver == "cg" else "solver_tol"
        if getattr(self, unused) is not None:
            raise ValueError(
                f"amigo with solver={self.solver!r} has no {unused} (solver_tol is cg's, "
                "solver_lr gd's): drop it or change solver"
            )
        self.solver_lr = 0.1 if self.solver_lr is None else self.solver_lr
        self.solver_tol = 1e-10 if self.solver_tol is None else self.solver_tol
        check_positive("solver_lr", self.solver_lr)
        tol = self.solver_tol
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
            raise ValueError(f"solver_tol must be a number >= 0, got {tol!r}")

    def first_step_checks(self, problem, b, lin):
        super().first_step_checks(problem, b, lin)
        if self.solver == "gd":
            check_step_size(self.operator(lin), b, self.solver_lr, self.name)

    def solve(self, problem, x, y, b, v0, lin):
        if self.solver == "gd":
            hvp = damped(fresh_batch_hvp(problem, x, y, lin), self.ridge)
            return fixed_point(hvp, b, v0, self.solver_lr, self.solver_iters)
        # CG needs one operator: its own batch, linearised once (the step's, without lower_data)
        cg_batch = problem.lower_batch()
        cg_lin = lin if problem.lower_data is None else problem.linearize_lower(x, y, cg_batch)
        return conjugate_gradient(self.operator(cg_lin), b, v0, self.solver_iters, self.solver_tol,
                                  host_scalars=on_cpu(b))  # fmt: skip

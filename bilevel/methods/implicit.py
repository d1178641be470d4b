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

from dataclasses import dataclass

from bilevel import tree as tr
from bilevel.checks import check_int, check_nonnegative, check_positive
from bilevel.linalg import SolveInfo, conjugate_gradient, fixed_point, neumann
from bilevel.linearization import LowerLinearization
from bilevel.methods.base import Method, MethodState, register
from bilevel.problem import Problem
from bilevel.tree import Tree


@dataclass
class ImplicitState(MethodState):
    """Adds the linear-system solution ``v`` (warm start for the next outer step)."""

    v: Tree | None = None


@dataclass(kw_only=True)
class Implicit(Method):
    """Shared AID step; subclasses choose the linear solver. ``solver_iters`` counts
    Hessian-vector products (J) for every solver."""

    KEEPS_INNER_STATE = True
    solver_iters: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("solver_iters", self.solver_iters, 0)

    def init(self, problem: Problem, x: Tree, y: Tree | None) -> ImplicitState:
        base = super().init(problem, x, y)
        return ImplicitState(y=base.y, y0=base.y0)

    def solve(
        self, problem: Problem, x: Tree, y: Tree, b: Tree, v0: Tree | None, lin: LowerLinearization
    ) -> tuple[Tree, SolveInfo]:
        """v ≈ (∇²_yy g)⁻¹ b; ``lin`` is ∇_y g linearised at this step's lower batch."""
        raise NotImplementedError

    def step(self, problem: Problem, x: Tree, state: ImplicitState) -> tuple[Tree, ImplicitState]:
        x = tr.detach(x)
        y = self.inner_loop(problem, x, state)
        gx, gy = problem.grad_upper(x, y, problem.upper_batch(), mode="autograd")
        # one linearisation of ∇_y g serves every HVP of the solve and the mixed product
        lin = problem.linearize_lower(x, y, problem.lower_batch())
        v0 = state.v if self.warm_start else None
        v, info = self.solve(problem, x, y, gy, v0, lin)
        hg = tr.sub(gx, lin.mixed(v))
        state.y, state.v = y, v
        state.info = {"solver_iterations": info.iterations}
        if info.residual is not None:
            state.info["residual"] = info.residual
        return hg, state


@register("cg")
@dataclass(kw_only=True)
class ConjugateGradient(Implicit):
    """AID with conjugate gradients on ∇²_yy g · v = ∇_y f (warm-started v).

    Stops at ``solver_iters`` iterations or relative residual ``solver_tol`` (0: no test, no
    host sync). Oracles: K inner gradients, 1 linearisation, J HVPs (+1 for the warm start),
    1 mixed product.
    """

    solver_tol: float = 1e-10

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("solver_iters", self.solver_iters, 1)  # 0 would leave v unsolved: hg = ∇_x f
        check_nonnegative("solver_tol", self.solver_tol)

    def solve(self, problem, x, y, b, v0, lin):
        return conjugate_gradient(lin.hvp, b, v0, self.solver_iters, self.solver_tol)


@register("neumann")
@dataclass(kw_only=True)
class NeumannSeries(Implicit):
    """AID with a truncated Neumann series v = η Σ_{j≤J} (I − ηA)^j ∇_y f (needs η < 2/L).

    J = ``solver_iters`` HVPs, so the series has J + 1 terms (J = 0: v = η ∇_y f). No warm
    start (the series restarts from ∇_y f). Oracles: K inner gradients, 1 linearisation, J HVPs,
    1 mixed product.
    """

    solver_lr: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("solver_lr", self.solver_lr)

    def solve(self, problem, x, y, b, v0, lin):
        return neumann(lin.hvp, b, self.solver_lr, self.solver_iters + 1)  # J HVPs: J + 1 terms


@register("fixed_point")
@dataclass(kw_only=True)
class FixedPoint(Implicit):
    """AID by fixed-point iteration v ← v − η(A v − ∇_y f), warm-started (hypertorch's
    ``fixed_point``). Oracles: K inner gradients, 1 linearisation, J HVPs, 1 mixed product."""

    solver_lr: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("solver_lr", self.solver_lr)

    def solve(self, problem, x, y, b, v0, lin):
        return fixed_point(lin.hvp, b, v0, self.solver_lr, self.solver_iters)

"""Krylov-subspace hypergradients: SubBiO and LancBiO.

Both estimate ∇F(x) = ∇_x f − ∇²_xy g · v with v ≈ A⁻¹ b (A = ∇²_yy g, b = ∇_y f) and, unlike
AID-CG, do not solve A v = b from scratch at each outer step: they carry a subspace across
steps. SubBiO minimises ½vᵀAv − bᵀv exactly over span{b, v − ηAv} each step (3 HVPs); LancBiO
grows a Lanczos basis by one vector per outer step with the *current* Hessian, solves the
projected tridiagonal system, and restarts from the last v every m steps (1 + 1/m HVPs).

Yang, Gao, Yuan, "LancBiO: Dynamic Lanczos-aided Bilevel Optimization via Krylov Subspace",
ICLR 2025 (arXiv 2404.03331): SubBiO is their Algorithm 1, LancBiO Algorithm 2 with the
dynamic Lanczos subroutine of Algorithm 4. Guards their code lacks: Lanczos breakdown and an
indefinite or singular projected matrix take a safe step and restart; optional full
re-orthogonalisation; float32 works.

Vectors are kept flat (one tensor per vector, :func:`bilevel.tree.flatten`) so a basis is one
matrix and the projections are matrix products.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from bilevel import tree as tr
from bilevel.checks import check_int, check_positive
from bilevel.inner import run_inner
from bilevel.linalg import projected_solve
from bilevel.linearization import LowerLinearization
from bilevel.methods.base import Method, register
from bilevel.methods.implicit import (
    RIDGE,
    ImplicitState,
    check_ridge,
    record_solve,
    require_lower_reaches_x,
)
from bilevel.problem import Problem
from bilevel.tree import Tree

# a Lanczos step whose new direction is this small relative to A q has broken down
_BREAKDOWN_RTOL = 100.0


def _unit(vector: Tensor) -> tuple[Tensor, Tensor]:
    """(vector / ‖vector‖, ‖vector‖), the zero vector for a zero input (no NaN, no sync)."""
    norm = torch.linalg.vector_norm(vector)
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    return torch.where(norm > 0, vector / safe, torch.zeros_like(vector)), norm


@dataclass(kw_only=True)
class _Krylov(Method):
    """Shared pieces: inner steps, the upper gradient and a flat Hessian-vector product.

    ``ridge`` ρ ≥ 0: the system is (∇²_yy g + ρI) v = ∇_y f, as for the AID methods."""

    ridge: float = RIDGE

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ridge(self.ridge)

    def _inner_and_upper(
        self, problem: Problem, x: Tree, state: ImplicitState
    ) -> tuple[Tree, Tree, Tree, LowerLinearization]:
        """(y after the inner steps, ∇_x f, ∇_y f, ∇_y g linearised at this step's lower batch:
        every product of the step is a pullback through it)."""
        y = run_inner(
            problem, x, self.inner_start(problem, x, state), self.inner_steps, self.optimizer
        )
        gx, gy = problem.grad_upper(x, y, problem.upper_batch())
        lin = problem.linearize_lower(x, y, problem.lower_batch())
        if not state.checked:
            require_lower_reaches_x(problem, lin, self.name)
            state.checked = True
        return y, gx, gy, lin

    def _flat_hvp(self, lin: LowerLinearization, like: Tree):
        """Flat v ↦ flat (∇²_yy g + ρI) · v (one counted HVP per call)."""
        rho = self.ridge
        if rho == 0:
            return lambda v: tr.flatten(lin.hvp(tr.unflatten(v, like)))
        return lambda v: tr.flatten(lin.hvp(tr.unflatten(v, like))) + rho * v


@register("subbio")
@dataclass(kw_only=True)
class SubBiO(_Krylov):
    """SubBiO: v = argmin of ½vᵀAv − bᵀv over span{b, v − ηAv}, one 2-D subspace per step.

    Each outer step runs K warm-started inner steps, then with b = ∇_y f and η = ``solver_lr``
    orthonormalises {b, v − ηA v}, forms the 2×2 projected matrix with two more HVPs and solves
    it. SOBA's step v − η(Av − b) lies in that span, so SubBiO's v is never worse than SOBA's on
    the step's quadratic. If the projected matrix is not positive definite (nonconvex lower
    level, b = 0) the step is SOBA's instead, counted in ``info["fallbacks"]``.
    Oracles per step: K inner gradients, 1 upper gradient, 1 linearisation, 3 HVPs, 1 mixed
    product.
    """

    solver_lr: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("solver_lr", self.solver_lr)

    def init(self, problem: Problem, x: Tree, y: Tree | None) -> ImplicitState:
        base = super().init(problem, x, y)
        state = ImplicitState(y=base.y, y0=base.y0, v=tr.zeros_like(base.y))
        state.info = {"fallbacks": torch.zeros((), dtype=torch.int64, device=_device(base.y))}
        return state

    def step(self, problem: Problem, x: Tree, state: ImplicitState) -> tuple[Tree, ImplicitState]:
        x = tr.detach(x)
        y, gx, gy, lin = self._inner_and_upper(problem, x, state)
        matvec = self._flat_hvp(lin, y)
        b, v = tr.flatten(gy), tr.flatten(state.v)
        av = matvec(v)
        residual = torch.linalg.vector_norm(av - b)  # of the previous v, on this step's system
        u = v - self.solver_lr * av
        soba = u + self.solver_lr * b  # v − η(Av − b), inside span{b, u}
        q1, _ = _unit(b)
        for _ in range(2):  # Gram–Schmidt twice: orthogonal to working precision
            u = u - (q1 @ u) * q1
        q2, u_norm = _unit(u)
        # u ∥ b: the subspace is 1-D; a unit q2 of rounding noise is dropped
        flat = u_norm <= _BREAKDOWN_RTOL * torch.finfo(b.dtype).eps * torch.linalg.norm(av)
        q2 = torch.where(flat, torch.zeros_like(q2), q2)
        aq1, aq2 = matvec(q1), matvec(q2)
        h11, h22 = q1 @ aq1, torch.where(flat, torch.ones_like(b[0]), q2 @ aq2)
        h12 = 0.5 * (q1 @ aq2 + q2 @ aq1)
        s, positive = projected_solve(
            torch.stack([h11, h22]), h12.reshape(1), torch.stack([q1 @ b, q2 @ b])
        )
        candidate = s[0] * q1 + s[1] * q2
        ok = positive & torch.isfinite(candidate).all()
        v = torch.where(ok, candidate, soba)
        state.y, state.v = y, tr.unflatten(v, y)
        state.info["fallbacks"] = state.info["fallbacks"] + (~ok).to(torch.int64)
        hg = tr.sub(gx, lin.mixed(state.v))
        record_solve(problem, state, hg, state.v, gy, self.ridge, residual=residual)
        return hg, state


@dataclass
class LancBiOState(ImplicitState):
    """LancBiO's state between outer steps (flat vectors).

    ``anchor`` v̄ and ``frozen`` w = A v̄ from the last restart; ``basis`` the Lanczos vectors
    of the cycle, the last one the current q; ``alphas`` / ``betas`` the diagonal and
    off-diagonal of the projected tridiagonal T; ``q_prev`` and ``beta`` the three-term
    recurrence's memory; ``cycle`` Lanczos steps since the restart, ``cycle_length`` the m
    fixed at that restart, ``m`` the schedule's current value, ``steps`` outer steps so far;
    ``pending`` the (breakdown, indefinite) flags of the last step, which force a restart.
    """

    anchor: Tensor | None = None
    frozen: Tensor | None = None
    basis: list[Tensor] = field(default_factory=list)
    alphas: list[Tensor] = field(default_factory=list)
    betas: list[Tensor] = field(default_factory=list)
    q_prev: Tensor | None = None
    beta: Tensor | None = None
    cycle: int = 0
    cycle_length: int = 0
    m: int = 1
    steps: int = 0
    restarts: int = 0
    pending: Tensor | None = None
    breakdowns: Tensor | None = None
    indefinite: Tensor | None = None


@register("lancbio")
@dataclass(kw_only=True)
class LancBiO(_Krylov):
    """LancBiO: a dynamic Lanczos basis across outer steps, restarted from the last v every m.

    Each outer step runs K warm-started inner steps, b = ∇_y f, then: at the start of a cycle
    v̄ ← v, w ← A v̄ (1 HVP), q ← (b − w)/‖b − w‖; one Lanczos step with the current Hessian
    grows the tridiagonal T; v = v̄ + Q T⁻¹ Qᵀ(b − w) (Qᵀ in full: A and b drift, so Q is only
    nearly orthogonal; T is solved by :func:`bilevel.linalg.projected_solve`). With A and b
    fixed the iterate is CG's.

    Options: ``m`` the cycle length (subspace size), grown every ``m_period`` steps to
    min(⌈``m_growth``·m⌉, ``m_max``) (taking effect at the next restart); ``window=True`` is the
    authors' variant for early epochs: no anchor and no restarts, the last m Lanczos vectors
    only, started from b; ``reorthogonalize`` orthogonalises each new vector against the cycle's
    basis (O(m·|y|) more work per step, no oracle); ``solver_lr`` η of the safe step.

    Guards (counted in ``info``): a breakdown (β ≈ 0: the Krylov space is invariant, e.g. A = I)
    restarts at the next step; an indefinite or singular T (or a non-finite solve) keeps the
    previous v — or, on a cycle's first step, takes SOBA's step v̄ + η(b − w) — warns, and
    restarts at the next step. The restart decision reads last step's flags on the host: it
    decides whether an HVP is spent, so it must be known there; ``solve`` synchronises the
    device after every step anyway, so the read waits on nothing.
    Oracles: K inner gradients, 1 upper gradient, 1 linearisation, 1 HVP per step + 1 per
    restart (none for the first, whose v̄ is 0, nor in window mode), 1 mixed product; memory
    m + 1 vectors.
    """

    m: int = 10
    m_growth: float = 1.0
    m_period: int = 50
    m_max: int = 100
    window: bool = False
    reorthogonalize: bool = False
    solver_lr: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("m", self.m, 1)
        check_int("m_period", self.m_period, 1)
        check_int("m_max", self.m_max, self.m)
        check_positive("solver_lr", self.solver_lr)
        if not isinstance(self.m_growth, (int, float)) or not self.m_growth >= 1:
            raise ValueError(f"m_growth must be a number >= 1, got {self.m_growth!r}")
        for name in ("window", "reorthogonalize"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def init(self, problem: Problem, x: Tree, y: Tree | None) -> LancBiOState:
        base = super().init(problem, x, y)
        zero = torch.zeros((), dtype=torch.int64, device=_device(base.y))
        return LancBiOState(
            y=base.y, y0=base.y0, v=tr.zeros_like(base.y), m=self.m, breakdowns=zero,
            indefinite=zero,
        )  # fmt: skip

    def step(self, problem: Problem, x: Tree, state: LancBiOState) -> tuple[Tree, LancBiOState]:
        x = tr.detach(x)
        y, gx, gy, lin = self._inner_and_upper(problem, x, state)
        matvec = self._flat_hvp(lin, y)
        b, v_prev = tr.flatten(gy), tr.flatten(state.v)
        if self._restart_due(state):
            self._restart(state, matvec, b, v_prev)
        r = b - state.frozen
        q = state.basis[-1]
        u = matvec(q)
        if state.q_prev is not None:
            u = u - state.beta * state.q_prev
        alpha = q @ u
        if state.cycle > 0:
            state.betas.append(state.beta)
        state.alphas.append(alpha)
        if self.window:
            self._trim(state, state.m)
        basis = torch.stack(state.basis)
        off = torch.stack(state.betas) if state.betas else alpha.new_zeros(0)
        s, positive = projected_solve(torch.stack(state.alphas), off, basis @ r)
        candidate = state.anchor + s @ basis
        ok = positive & torch.isfinite(candidate).all()
        first = state.cycle == 0 and not self.window
        fallback = state.anchor + self.solver_lr * r if first else v_prev
        v = torch.where(ok, candidate, fallback)
        omega = u - alpha * q
        if self.reorthogonalize:
            omega = omega - (basis @ omega) @ basis
        q_next, beta = _unit(omega)
        u_norm = torch.linalg.vector_norm(u)
        breakdown = beta <= _BREAKDOWN_RTOL * torch.finfo(b.dtype).eps * u_norm
        breakdown = breakdown | ~torch.isfinite(beta)
        indefinite = ~ok & (u_norm > 0)  # q = 0 (b = A v̄ exactly) is not a failure
        state.basis.append(torch.where(breakdown, torch.zeros_like(q_next), q_next))
        state.q_prev, state.beta, state.cycle = q, beta, state.cycle + 1
        state.pending = torch.stack([breakdown, indefinite])
        state.breakdowns = state.breakdowns + breakdown.to(torch.int64)
        state.indefinite = state.indefinite + indefinite.to(torch.int64)
        state.y, state.v = y, tr.unflatten(v, y)
        self._schedule(state)
        state.info = {
            "subspace_dim": len(state.alphas),
            "m": state.m,
            "restarts": state.restarts,
            "breakdowns": state.breakdowns,
            "indefinite": state.indefinite,
        }
        # the Lanczos residual estimate β_next·|last entry of T⁻¹Qᵀr| (exact for a fixed A, b);
        # a fallback step is measured by the restart residual ‖b − A v̄‖ instead
        residual = torch.where(ok, beta * s[-1].abs(), torch.linalg.vector_norm(r))
        hg = tr.sub(gx, lin.mixed(state.v))
        record_solve(problem, state, hg, state.v, gy, self.ridge, residual=residual)
        return hg, state

    def _restart_due(self, state: LancBiOState) -> bool:
        if state.frozen is None:  # first step
            return True
        if not self.window and state.cycle >= state.cycle_length:
            return True
        breakdown, indefinite = state.pending.tolist()  # host read: see the class docstring
        if indefinite:
            warnings.warn(
                "lancbio: the projected matrix T was not positive definite (indefinite or "
                "singular Hessian along the Krylov space); took a safe step and restarted",
                RuntimeWarning,
                stacklevel=3,
            )
        return breakdown or indefinite

    def _restart(self, state: LancBiOState, matvec, b: Tensor, v: Tensor) -> None:
        """v̄ ← v, w ← A v̄ (no HVP when v̄ is 0: the first step, window mode); basis [q]."""
        if self.window or state.frozen is None:
            state.anchor = v if not self.window else torch.zeros_like(v)
            state.frozen = torch.zeros_like(v)
        else:
            state.anchor, state.frozen = v, matvec(v)
        q, _ = _unit(b - state.frozen)
        state.basis, state.alphas, state.betas = [q], [], []
        state.q_prev, state.beta, state.cycle = None, None, 0
        state.cycle_length = state.m
        state.restarts += 1

    @staticmethod
    def _trim(state: LancBiOState, size: int) -> None:
        """Window mode: keep the last ``size`` Lanczos vectors and their block of T."""
        extra = len(state.alphas) - size
        if extra > 0:
            del state.basis[:extra], state.alphas[:extra], state.betas[:extra]

    def _schedule(self, state: LancBiOState) -> None:
        """Every m_period steps m ← min(⌈growth·m⌉, m_max) (tolerance: 10·1.1 is 11, not 12)."""
        state.steps += 1
        if state.steps % self.m_period == 0:
            state.m = min(math.ceil(state.m * self.m_growth - 1e-9), self.m_max)


def _device(tree: Tree) -> torch.device:
    return next(iter(tree.values())).device

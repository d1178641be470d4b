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
from typing import Any

import torch
from torch import Tensor

from bilevel import tree as tr
from bilevel.checks import check_int, check_nonnegative, check_positive
from bilevel.linalg import damped, projected_solve
from bilevel.linearization import LowerLinearization
from bilevel.methods.base import Method, register
from bilevel.methods.implicit import (
    RIDGE,
    ImplicitState,
    record_solve,
    require_lower_reaches_x_once,
)
from bilevel.problem import Problem
from bilevel.tree import Tree

# a Lanczos step whose new direction is this small relative to A q has broken down
_BREAKDOWN_RTOL = 100.0
# an iterate whose norm grew this much since the last anchor is not trusted as the next one
_JUMP = 1e3
_JUMP_RESIDUAL = 10.0  # an anchor with ‖b − A v̄‖ above this × ‖b‖ is worse than v̄ = 0


def _unit(vector: Tensor) -> tuple[Tensor, Tensor]:
    """(vector / ‖vector‖, ‖vector‖), the zero vector for a zero input (no NaN, no sync)."""
    norm = torch.linalg.vector_norm(vector)
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    return torch.where(norm > 0, vector / safe, torch.zeros_like(vector)), norm


@dataclass(kw_only=True)
class _Krylov(Method):
    """Shared pieces: inner steps, the upper gradient and a flat Hessian-vector product.

    ``ridge`` ρ ≥ 0: the system is (∇²_yy g + ρI) v = ∇_y f, as for the AID methods (no oracle
    call: ρv is added to each HVP)."""

    KEEPS_INNER_STATE = True
    ridge: float = RIDGE

    def __post_init__(self) -> None:
        super().__post_init__()
        check_nonnegative("ridge", self.ridge)

    def _inner_and_upper(
        self, problem: Problem, x: Tree, state: ImplicitState
    ) -> tuple[Tree, Tree, Tree, LowerLinearization]:
        """(y after the inner steps, ∇_x f, ∇_y f, ∇_y g linearised at this step's lower batch:
        every product of the step is a pullback through it)."""
        y = self.inner_loop(problem, x, state)
        gx, gy = problem.grad_upper(x, y, problem.upper_batch(), mode="autograd")
        lin = problem.linearize_lower(x, y, problem.lower_batch())
        require_lower_reaches_x_once(problem, lin, state, self.name)
        return y, gx, gy, lin

    def _flat_hvp(self, lin: LowerLinearization, like: Tree):
        """Flat v ↦ flat (∇²_yy g + ρI) · v (one counted HVP per call)."""
        hvp = damped(lin.hvp, self.ridge)
        return lambda v: tr.flatten(hvp(tr.unflatten(v, like)))


@register("subbio")
@dataclass(kw_only=True)
class SubBiO(_Krylov):
    """SubBiO: v = argmin of ½vᵀAv − bᵀv over span{b, v − ηAv}, one 2-D subspace per step.

    Each outer step runs K warm-started inner steps, then with b = ∇_y f and η = ``solver_lr``
    (default ``None``: η = ``inner_lr``, scale-aware — the inner loop needs it below 2/L to
    converge, and so does the fallback step v − η(Av − b); a fixed 0.1 is not when L > 20)
    orthonormalises {b, v − ηA v}, forms the 2×2 projected matrix with two more HVPs and solves
    it. SOBA's step v − η(Av − b) lies in that span, so SubBiO's v is never worse than SOBA's on
    the step's quadratic. If the projected matrix is not positive definite (nonconvex lower
    level, b = 0) the step is SOBA's instead, counted in ``info["fallbacks"]``.
    Oracles per step: K inner gradients, 1 upper gradient, 1 linearisation, 3 HVPs, 1 mixed
    product.
    """

    solver_lr: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.solver_lr is not None:
            check_positive("solver_lr", self.solver_lr)
        self.eta = self.inner_lr if self.solver_lr is None else self.solver_lr

    def init(self, problem: Problem, x: Tree, y: Tree | None) -> ImplicitState:
        base = super().init(problem, x, y)
        state = ImplicitState(y=base.y, y0=base.y0, v=tr.zeros_like(base.y))
        state.info = {"fallbacks": torch.zeros((), dtype=torch.int64, device=tr.device(base.y))}
        return state

    def step(self, problem: Problem, x: Tree, state: ImplicitState) -> tuple[Tree, ImplicitState]:
        x = tr.detach(x)
        y, gx, gy, lin = self._inner_and_upper(problem, x, state)
        matvec = self._flat_hvp(lin, y)
        b, v = tr.flatten(gy), tr.flatten(state.v)
        av = matvec(v)
        residual = torch.linalg.vector_norm(av - b)  # of the previous v, on this step's system
        u = v - self.eta * av
        soba = u + self.eta * b  # v − η(Av − b), inside span{b, u}
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
    batch: Any = None
    b_prev: Tensor | None = None
    anchor_norm: Tensor | None = None
    anchor_resets: int | Tensor = 0


WINDOWS = (False, "sliding", "authors")


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
    min(⌈``m_growth``·m⌉, ``m_max``) (taking effect at the next restart); ``window``: ``False``
    the restart/residual variant above (Algorithm 2), ``"authors"`` the authors' windowed
    variant as their code has it (``lancbio_tridiag``): no anchor, a restart every m steps from
    the previous step's b (a seeded uniform vector at the first), at most max(m − 1, 1)
    vectors in the projected system (their m = 1 keeps none, so v = 0: not copied),
    ``"sliding"`` our own windowed form: no anchor, never restarted, the last m vectors,
    started from the current b; ``restart_rule``: ``"cycle"`` (a cycle runs its m steps; m grows
    after steps m_period, 2·m_period, …) or ``"modulo"`` (the authors' synthetic code: m grows
    before 1-based step k ≡ m_period − 1 (mod m_period), a restart when k mod m = 1 or m = 1,
    cutting the cycle in progress); ``warmup_steps`` E > 0 gives the official two-phase
    schedule: ``window="authors"`` with cap ``warmup_m_max`` for the first E steps, then the
    configured variant with cap ``m_max``, restarted at step E from the windowed v;
    ``reorthogonalize`` orthogonalises each new vector against the cycle's
    basis (O(m·|y|) more work per step, no oracle); ``fallback_lr`` η of the safe step
    taken when T is not positive definite (default ``None``: ``inner_lr``, below 2/L when the
    inner loop converges; renamed from ``solver_lr``: LancBiO has no solver step);
    ``hold_batch`` (default ``None``: on when the problem has ``lower_data``) linearises every
    step of a Lanczos cycle at the lower batch drawn at the cycle's restart, so T projects one
    batch's Hessian (with a fresh batch per step T projects no single matrix and its errors
    compound across cycles); the inner steps still see fresh batches.

    Guards (counted in ``info``): a breakdown (β ≈ 0: the Krylov space is invariant, e.g. A = I)
    restarts at the next step; an indefinite or singular T (or a non-finite solve) keeps the
    previous v — or, on a cycle's first step, takes SOBA's step v̄ + η(b − w) — warns, and
    restarts at the next step. A solve whose step s = T⁻¹Qᵀr has ‖s‖·√eps·‖T‖ > ‖Qᵀr‖ (T's
    smallest eigenvalue below √eps·‖T‖: a near-singular T that passes the pivot test, the
    cause of mini-batch blow-ups) is treated the same way. At a restart, an iterate whose norm
    jumped above ``_JUMP`` × the last anchor's (or is not finite), or whose residual
    ‖b − A v̄‖ at the restart is above 10‖b‖ (v̄ = 0 would do better; the product is the
    restart's own, no host sync), is not used as anchor: the cycle starts from v̄ = 0
    (``info["anchor_resets"]``). With batches that change between cycles this is what keeps v
    from growing geometrically: a Galerkin cycle can lengthen the error by up to √κ. With
    ``ridge`` ρ > 0, v stays in the ball ‖v‖ ≤ ‖b‖/ρ (the damped solution's bound when
    A ⪰ 0): a longer projected solution is treated as an indefinite T and a safe step is
    shortened onto the ball. The restart decision
    reads last step's flags on the host: it decides whether an HVP is spent, so it must be known
    there; ``solve`` synchronises the device after every step anyway, so the read waits on
    nothing.
    Oracles: K inner gradients, 1 upper gradient, 1 linearisation, 1 HVP per step + 1 per
    restart (none for the first, whose v̄ is 0, nor in window mode), 1 mixed product; memory
    m + 1 vectors.
    """

    m: int = 10
    m_growth: float = 1.0
    m_period: int = 50
    m_max: int = 100
    window: bool | str = False
    restart_rule: str = "cycle"
    warmup_steps: int = 0
    warmup_m_max: int = 300
    reorthogonalize: bool = False
    fallback_lr: float | None = None
    hold_batch: bool | None = None
    RENAMED = {"solver_lr": "fallback_lr"}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("m", self.m, 1)
        check_int("m_period", self.m_period, 1)
        check_int("m_max", self.m_max, self.m)
        if self.fallback_lr is not None:
            check_positive("fallback_lr", self.fallback_lr)
        self.eta = self.inner_lr if self.fallback_lr is None else self.fallback_lr
        if not isinstance(self.m_growth, (int, float)) or not self.m_growth >= 1:
            raise ValueError(f"m_growth must be a number >= 1, got {self.m_growth!r}")
        if self.hold_batch is not None and not isinstance(self.hold_batch, bool):
            raise ValueError(f"hold_batch must be None, True or False, got {self.hold_batch!r}")
        if self.window is True:
            raise ValueError(
                "window=True is now window='sliding' (the authors' variant is window='authors')"
            )
        if self.window not in WINDOWS:
            raise ValueError(f"window must be False, 'sliding' or 'authors', got {self.window!r}")
        if self.restart_rule not in ("cycle", "modulo"):
            raise ValueError(f"restart_rule must be 'cycle' or 'modulo', got {self.restart_rule!r}")
        check_int("warmup_steps", self.warmup_steps, 0)
        check_int("warmup_m_max", self.warmup_m_max, self.m)
        if not isinstance(self.reorthogonalize, bool):
            raise ValueError(f"reorthogonalize must be True or False, got {self.reorthogonalize!r}")

    def init(self, problem: Problem, x: Tree, y: Tree | None) -> LancBiOState:
        base = super().init(problem, x, y)
        zero = torch.zeros((), dtype=torch.int64, device=tr.device(base.y))
        return LancBiOState(
            y=base.y, y0=base.y0, v=tr.zeros_like(base.y), m=self.m, breakdowns=zero,
            indefinite=zero,
        )  # fmt: skip

    def step(self, problem: Problem, x: Tree, state: LancBiOState) -> tuple[Tree, LancBiOState]:
        x = tr.detach(x)
        y = self.inner_loop(problem, x, state)
        gx, gy = problem.grad_upper(x, y, problem.upper_batch(), mode="autograd")
        mode = self._mode(state)
        if self.restart_rule == "modulo":
            self._grow(state, before=True)
        restart = self._restart_due(state, mode)
        batch = problem.lower_batch()  # drawn every step: the stream stays the same either way
        if self._holds(problem):
            if restart or state.batch is None:
                state.batch = batch
            batch = state.batch
        lin = problem.linearize_lower(x, y, batch)
        require_lower_reaches_x_once(problem, lin, state, self.name)
        matvec = self._flat_hvp(lin, y)
        b, v_prev = tr.flatten(gy), tr.flatten(state.v)
        if restart:
            self._restart(state, matvec, b, v_prev, mode)
        state.b_prev = b
        r = b - state.frozen
        q = state.basis[-1]
        u = matvec(q)
        if state.q_prev is not None:
            u = u - state.beta * state.q_prev
        alpha = q @ u
        if state.cycle > 0:
            state.betas.append(state.beta)
        state.alphas.append(alpha)
        if mode == "sliding":
            self._trim(state, state.m)
        elif mode == "authors":
            self._trim(state, max(state.m - 1, 1))
        basis = torch.stack(state.basis)
        off = torch.stack(state.betas) if state.betas else alpha.new_zeros(0)
        rhs = basis @ r
        alphas = torch.stack(state.alphas)
        s, positive = projected_solve(alphas, off, rhs)
        candidate = state.anchor + s @ basis
        scale = alphas.abs().max() + (2 * off.abs().max() if off.numel() else 0.0)
        sqrt_eps = torch.finfo(b.dtype).eps ** 0.5
        bounded = torch.linalg.vector_norm(s) * sqrt_eps * scale <= torch.linalg.vector_norm(rhs)
        # ‖(A + ρI)⁻¹ b‖ ≤ ‖b‖/ρ when A ⪰ 0: with a ridge, a longer v comes from negative
        # curvature; such a solve counts as indefinite and the fallback is kept inside the ball
        radius = torch.linalg.vector_norm(b) / self.ridge if self.ridge > 0 else None
        if radius is not None:
            bounded = bounded & (torch.linalg.vector_norm(candidate) <= radius)
        ok = positive & bounded & torch.isfinite(candidate).all()
        first = state.cycle == 0 and not mode
        fallback = state.anchor + self.eta * r if first else v_prev
        if radius is not None:
            length = torch.linalg.vector_norm(fallback)
            fallback = torch.where(length > radius, fallback * (radius / length), fallback)
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
        state.steps += 1
        if self.restart_rule == "cycle":
            self._grow(state, before=False)
        state.info = {
            "subspace_dim": len(state.alphas),
            "m": state.m,
            "restarts": state.restarts,
            "breakdowns": state.breakdowns,
            "indefinite": state.indefinite,
            "anchor_resets": state.anchor_resets,
        }
        # the Lanczos residual estimate β_next·|last entry of T⁻¹Qᵀr| (exact for a fixed A, b);
        # a fallback step is measured by the restart residual ‖b − A v̄‖ instead
        estimate = beta * s[-1].abs()
        residual = torch.where(ok & torch.isfinite(estimate), estimate, torch.linalg.vector_norm(r))
        hg = tr.sub(gx, lin.mixed(state.v))
        record_solve(problem, state, hg, state.v, gy, self.ridge, residual=residual)
        return hg, state

    def _holds(self, problem: Problem) -> bool:
        return problem.lower_data is not None if self.hold_batch is None else self.hold_batch

    def _mode(self, state: LancBiOState) -> bool | str:
        """The variant this step runs: the windowed warm-up phase, then ``window``."""
        return "authors" if state.steps < self.warmup_steps else self.window

    def _restart_due(self, state: LancBiOState, mode: bool | str) -> bool:
        if state.frozen is None:  # first step
            return True
        if self.warmup_steps and state.steps == self.warmup_steps:  # the warm-up ends
            state.m = min(state.m, self.m_max)
            return True
        if self.restart_rule == "modulo" and mode != "sliding":
            k = state.steps + 1
            if k % state.m == 1 or state.m == 1:
                return True
        elif mode != "sliding" and state.cycle >= state.cycle_length:
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

    def _restart(self, state: LancBiOState, matvec, b: Tensor, v: Tensor, mode) -> None:
        """v̄ ← v, w ← A v̄ (no HVP when v̄ is 0: the first step, window modes); basis [q]."""
        start = b
        if mode == "authors":  # the previous step's b; the authors' uniform vector at first
            if state.b_prev is None:
                gen = torch.Generator(device=b.device).manual_seed(0)
                state.b_prev = torch.rand(b.shape, generator=gen, dtype=b.dtype, device=b.device)
            start = state.b_prev
        if mode or state.frozen is None:
            state.anchor = v if not mode else torch.zeros_like(v)
            state.frozen = torch.zeros_like(v)
        else:
            norm = torch.linalg.vector_norm(v)
            if state.anchor_norm is not None:
                ref = state.anchor_norm
                jumped = ~torch.isfinite(norm) | ((ref > 0) & (norm > _JUMP * ref))
                if bool(jumped):  # host read, once per restart (as the restart decision)
                    v, norm = torch.zeros_like(v), torch.zeros_like(norm)
                    state.anchor_resets += 1
                norm = torch.maximum(ref, norm)
            # an anchor whose residual at this batch is _JUMP_RESIDUAL × ‖b‖ is dropped (no host
            # sync; the product is the restart's own): with batches that change between cycles
            # each Galerkin cycle can lengthen v by up to √κ, so this bounds v̄ by ~11‖b‖/λ_min
            av = matvec(v)
            keep = torch.linalg.vector_norm(b - av) <= _JUMP_RESIDUAL * torch.linalg.vector_norm(b)
            v, av = torch.where(keep, v, 0.0), torch.where(keep, av, 0.0)
            state.anchor_resets = state.anchor_resets + (~keep).to(torch.int64)
            state.anchor, state.frozen, state.anchor_norm = v, av, torch.where(keep, norm, 0.0)
        q, _ = _unit(start - state.frozen)
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

    def _grow(self, state: LancBiOState, before: bool) -> None:
        """m ← min(⌈growth·m⌉, cap) (tolerance: 10·1.1 is 11, not 12) after every m_period
        steps ("cycle"), or before 1-based step k ≡ m_period − 1 (mod m_period) ("modulo");
        the cap is ``warmup_m_max`` during the warm-up, else ``m_max``."""
        k = state.steps + 1 if before else state.steps
        due = k % self.m_period == (self.m_period - 1 if before else 0) % self.m_period
        if due:
            index = state.steps if before else state.steps - 1  # the step it belongs to
            cap = self.warmup_m_max if index < self.warmup_steps else self.m_max
            state.m = min(math.ceil(state.m * self.m_growth - 1e-9), cap)

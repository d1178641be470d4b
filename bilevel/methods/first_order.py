"""Fully first-order bilevel methods: F2SA and BOME.

Both replace the implicit function theorem by a value-function view of the lower level,
g(x, y) − g*(x) ≤ 0 with g*(x) = min_y g(x, y), and use gradients only: ∇_y g, ∇_x g and
(∇_x f, ∇_y f), never a Hessian-vector or mixed product and no graph through the inner loop.

- F2SA: Kwon, Kwon, Wright, Nowak, "A Fully First-Order Method for Stochastic Bilevel
  Optimization", ICML 2023. The penalty L_λ(x, y) = f(x, y) + λ(g(x, y) − g*(x)) with λ grown
  over the outer steps; its x-gradient at y = argmin L_λ(x, ·) is within O(1/λ) of ∇F(x).
- BOME: Liu, Ye, Wright, Stone, Liu, "BOME! Bilevel Optimization Made Easy: A Simple
  First-Order Approach", NeurIPS 2022. The constraint q(x, y) = g(x, y) − g(x, y_T(x)) ≤ 0
  handled by a dynamic-barrier step on (x, y) jointly.

Neither assumes a unique lower-level solution: both approach the optimistic solution (the
f-best point of argmin_y g) where methods that follow ∇_y g alone pick whichever solution the
start point gives (see docs/methods/first_order.md and tests/test_first_order.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bilevel import tree as tr
from bilevel.checks import check_int, check_positive
from bilevel.inner import run_inner
from bilevel.methods.base import Method, MethodState, register
from bilevel.problem import Problem
from bilevel.tree import Tree

LAM_SCHEDULES = ("linear", "power")
PHI_CHOICES = ("grad_norm", "value")
# benchopt benchmark_bilevel's F2SA defaults: lmbda0 = 1, delta_lmbda = 0.1 per outer step
DEFAULT_LAM_GROWTH = 0.1
DEFAULT_LAM_POWER = 0.5


@dataclass
class F2SAState(MethodState):
    """``y`` is the paper's z (tracks argmin g: the lower-level iterate every evaluation reads),
    ``y_penalty`` the paper's y (tracks argmin f/λ + g), ``t`` the outer-step counter that sets
    λ (checkpointed with the state)."""

    y_penalty: Tree | None = None
    t: int = 0


@register("f2sa")
@dataclass(kw_only=True)
class F2SA(Method):
    """F2SA: fully first-order penalty method, hg = ∇_x f(x, y_λ) + λ(∇_x g(x, y_λ) − ∇_x g(x, z)).

    Kwon, Kwon, Wright, Nowak, ICML 2023. Each outer step runs ``inner_steps`` T steps of
    ``inner_optimizer`` on two sequences from their previous values (``warm_start``):

        z ← z − η ∇_y g(x, z)                    z ≈ y*(x) = argmin g          (``state.y``)
        y ← y − η (∇_y g(x, y) + ∇_y f(x, y)/λ)   y ≈ y*_λ(x) = argmin f + λg   (``y_penalty``)

    with η = ``inner_lr``: the paper's step on the penalised sequence is α = η/λ, so both
    sequences stay stable at the same η whatever λ (the paper's α λ ≲ γ). The estimate
    ∇_x f(x, y) + λ(∇_x g(x, y) − ∇_x g(x, z)) has bias O(1/λ) once the sequences converge.

    Options:
        lam: λ at the first outer step (default 1, benchopt's ``lmbda0``).
        lam_schedule: ``linear`` λ_t = lam + lam_growth·t (default, benchopt's schedule) or
            ``power`` λ_t = lam·(t + 1)^lam_power (the paper's polynomial growth); t counts the
            outer steps. Either is capped at ``lam_max`` (None: no cap).
        lam_growth: increment per outer step of the linear schedule (default 0.1, benchopt's
            ``delta_lmbda``; 0 keeps λ constant).
        lam_power: exponent of the power schedule (default 0.5, our choice: the paper ties the
            exponent to its step-size exponents, which depend on the noise regime).

    Mini-batches: every inner step draws one lower batch for both sequences and one upper
    batch; the final estimate draws one upper batch and one lower batch shared by both
    ∇_x g terms (common random numbers: the difference is multiplied by λ, so independent
    batches would add noise of order λ). Oracles per step: 2T inner gradients, T + 1 upper
    gradients, 2 x-gradients of g.
    """

    lam: float = 1.0
    lam_schedule: str = "linear"
    lam_growth: float | None = None
    lam_power: float | None = None
    lam_max: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("inner_steps", self.inner_steps, 1)
        check_positive("lam", self.lam)
        if self.lam_schedule not in LAM_SCHEDULES:
            raise ValueError(
                f"unknown lam_schedule {self.lam_schedule!r}; choose one of "
                f"{', '.join(LAM_SCHEDULES)}"
            )
        if self.lam_schedule == "linear":
            if self.lam_power is not None:
                raise ValueError("lam_power applies to lam_schedule='power' only (it is 'linear')")
            if self.lam_growth is None:
                self.lam_growth = DEFAULT_LAM_GROWTH
            _check_nonnegative("lam_growth", self.lam_growth)
        else:
            if self.lam_growth is not None:
                raise ValueError("lam_growth applies to lam_schedule='linear' only (it is 'power')")
            if self.lam_power is None:
                self.lam_power = DEFAULT_LAM_POWER
            _check_nonnegative("lam_power", self.lam_power)
        if self.lam_max is not None:
            check_positive("lam_max", self.lam_max)
            if self.lam_max < self.lam:
                raise ValueError(f"lam_max ({self.lam_max!r}) must be >= lam ({self.lam!r})")

    def multiplier(self, t: int) -> float:
        """λ at outer step ``t`` (0-based)."""
        if self.lam_schedule == "linear":
            lam = self.lam + self.lam_growth * t
        else:
            lam = self.lam * (t + 1) ** self.lam_power
        return lam if self.lam_max is None else min(lam, self.lam_max)

    def init(self, problem: Problem, x: Tree, y: Tree | None) -> F2SAState:
        base = super().init(problem, x, y)
        return F2SAState(y=base.y, y0=base.y0, y_penalty=base.y)

    def step(self, problem: Problem, x: Tree, state: F2SAState) -> tuple[Tree, F2SAState]:
        x = tr.detach(x)
        lam = self.multiplier(state.t)
        z = self.inner_start(problem, x, state)
        y = state.y_penalty if self.warm_start and problem.init_lower is None else z
        opt = self.optimizer
        z_state, y_state = opt.init(z), opt.init(y)
        for _ in range(self.inner_steps):
            batch = problem.lower_batch()
            z, z_state = opt.update(z, problem.grad_lower_y(x, z, batch), z_state)
            _, f_y = problem.grad_upper(x, y, problem.upper_batch())
            direction = tr.axpy(1.0 / lam, f_y, problem.grad_lower_y(x, y, batch))
            y, y_state = opt.update(y, direction, y_state)
        f_x, _ = problem.grad_upper(x, y, problem.upper_batch())
        batch = problem.lower_batch()
        gap = tr.sub(problem.grad_lower_x(x, y, batch), problem.grad_lower_x(x, z, batch))
        state.y, state.y_penalty, state.t = z, y, state.t + 1
        state.info = {"lam": torch.tensor(lam)}
        return tr.axpy(lam, gap, f_x), state


@register("bome")
@dataclass(kw_only=True)
class BOME(Method):
    """BOME: dynamic-barrier joint step on (x, y) for min f s.t. q = g(x, y) − g(x, y_T) ≤ 0.

    Liu, Ye, Wright, Stone, Liu, NeurIPS 2022. Each outer step runs ``inner_steps`` T steps of
    ``inner_optimizer`` (step ``inner_lr``) on g(x, ·) from y (``warm_start=False``: from the
    user's y0 or ``init_lower(x)``) to get y_T, held constant, then with ∇q = (∇_x g(x, y) −
    ∇_x g(x, y_T), ∇_y g(x, y)) and ∇f = (∇_x f, ∇_y f) at (x, y):

        λ = max(φ − ⟨∇f, ∇q⟩, 0) / ‖∇q‖²,     d = ∇f + λ ∇q       (λ = 0 when ∇q = 0)

    The x-part d_x is returned as the hypergradient; the method moves y itself,
    y ← y − ``y_lr``·d_y. The paper steps both by one ξ: with ``outer_optimizer="sgd"`` and
    ``outer_lr = y_lr = ξ`` this is exactly its update (any other outer optimizer steps x its
    own way and y by plain gradient steps).

    Options:
        eta: η of the barrier φ (default 0.5, benchopt's default).
        phi: ``grad_norm`` φ = η‖∇q‖² (default, the paper's choice in its experiments) or
            ``value`` φ = η q(x, y) (2 more lower evaluations).
        y_lr: the step of y along d_y (default 0.1, benchopt's ``step_size``).

    ``state.y`` is the jointly updated y. Mini-batches: each inner step draws a lower batch;
    the three g-terms of ∇q (and q for ``phi="value"``) share one lower batch, ∇f uses one
    upper batch. Oracles per step: T + 1 inner gradients, 2 x-gradients of g, 1 upper gradient
    (+ 2 lower evaluations for ``phi="value"``).
    """

    eta: float = 0.5
    phi: str = "grad_norm"
    y_lr: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("inner_steps", self.inner_steps, 1)
        check_positive("eta", self.eta)
        check_positive("y_lr", self.y_lr)
        if self.phi not in PHI_CHOICES:
            raise ValueError(f"unknown phi {self.phi!r}; choose one of {', '.join(PHI_CHOICES)}")

    def step(self, problem: Problem, x: Tree, state: MethodState) -> tuple[Tree, MethodState]:
        x = tr.detach(x)
        y = state.y
        if self.warm_start:
            start = y
        elif problem.init_lower is not None:
            start = tr.detach(problem.init_lower(x))
        else:
            start = state.y0
        y_t = tr.detach(run_inner(problem, x, start, self.inner_steps, self.optimizer))
        f_x, f_y = problem.grad_upper(x, y, problem.upper_batch())
        batch = problem.lower_batch()
        q_x = tr.sub(problem.grad_lower_x(x, y, batch), problem.grad_lower_x(x, y_t, batch))
        q_y = problem.grad_lower_y(x, y, batch)
        squared = tr.dot(q_x, q_x) + tr.dot(q_y, q_y)
        if self.phi == "grad_norm":
            phi = self.eta * squared
        else:
            gap = problem.lower_value(x, y, batch) - problem.lower_value(x, y_t, batch)
            phi = self.eta * gap
        inner = tr.dot(f_x, q_x) + tr.dot(f_y, q_y)
        positive = squared > 0
        lam = torch.where(
            positive, torch.clamp(phi - inner, min=0) / torch.where(positive, squared, 1.0), 0.0
        )
        d_y = tr.axpy(lam, q_y, f_y)
        state.y = tr.axpy(-self.y_lr, d_y, y)
        state.info = {"lam": lam, "q_grad_norm": torch.sqrt(squared)}
        return tr.axpy(lam, q_x, f_x), state


def _check_nonnegative(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")


__all__ = ["BOME", "F2SA", "F2SAState"]

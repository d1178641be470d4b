"""BDA: bi-level descent aggregation, for lower levels with many solutions.

When argmin_y g(x, y) is a set, descending g alone lands on whichever solution the start point
picks, not the one best for the upper level. BDA's inner steps also descend f with a vanishing
weight α_k, so the iterates approach the f-best point of the solution set (the optimistic
bilevel problem):

    y_{k+1} = y_k − [α_k · s_u · ∇_y f(x, y_k) + (1 − α_k) · s_l · ∇_y g(x, y_k)]

Liu, Mu, Yuan, Zeng, Zhang, "A Generic First-Order Algorithmic Framework for Bi-Level Programming
Beyond Lower-Level Singleton", ICML 2020; Liu, Mu, Yuan, Zeng, Zhang, "A General Descent
Aggregation Framework for Gradient-based Bi-level Optimization", TPAMI 2022 (one-stage variant).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad

from bilevel import tree as tr
from bilevel.checks import check_int, check_positive
from bilevel.inner import GradientDescent, run_aggregated
from bilevel.methods.base import Method, MethodState, register
from bilevel.problem import Problem
from bilevel.tree import Tree

MODES = ("reverse", "truncated", "onestage")
SCHEDULES = ("harmonic", "geometric", "constant", "learnable")
DEFAULT_LOWER_STEP = 0.1


@dataclass
class BDAState(MethodState):
    """Adds ``mu``: the current aggregation weight when ``schedule="learnable"`` (a 0-dim
    tensor updated by its own hypergradient), else ``None``."""

    mu: Tensor | None = None


@register("bda")
@dataclass(kw_only=True)
class BDA(Method):
    """Bi-level descent aggregation (BDA): inner steps mix ∇_y f into ∇_y g with weights α_k.

    Options:
        mu: aggregation weight μ in [0, 1]; μ = 0 is plain unrolled dynamics (``itd``).
        schedule: α_k = μ/(k+1) ``harmonic`` (paper; default), μ·decay^k ``geometric``,
            μ ``constant`` (default for ``onestage``), or ``learnable``: harmonic with μ
            updated by SGD (step ``mu_lr``) on its own hypergradient ∂f(x, y_K)/∂μ, clamped to
            [0, 1]. The schedule restarts at k = 0 every outer step.
        s_u: step on ∇_y f (default: the step on ∇_y g).
        inner_lr: the paper's s_l, the step on ∇_y g (default 0.1; an ``inner_optimizer``
            instance's own lr must agree). The old alias ``s_l`` is rejected: one name per
            option across methods. The aggregated direction
            α_k·(s_u/s_l)·∇_y f + (1 − α_k)·∇_y g is fed to ``inner_optimizer`` (gd, momentum,
            nesterov, adam or an instance), so with ``gd`` the step is exactly the paper's.
        mode: ``reverse`` (through all K aggregated steps, and through ``init_lower``),
            ``truncated`` (last ``truncate`` steps) or ``onestage`` (finite-difference
            correction at the perturbed initial point, no graph; needs ``gd`` and a constant α).
        fd_radius: r of the one-stage perturbation ε = r/‖∇_y f(x, y_K)‖.

    Oracles (K steps, differentiated k, n_f of them with α_k ≠ 0): forward K inner gradients
    and n_f upper gradients; reverse/truncated add 1 upper gradient, k HVPs and k mixed
    products of g, n_f of each for f (``upper_hvp``, ``upper_mixed``); onestage adds 1 upper
    gradient and 2 x-gradients of each of g and f (of only one when α is 0 or 1).
    """

    inner_lr: float | None = None
    mu: float = 0.5
    schedule: str | None = None
    decay: float = 0.9
    mu_lr: float = 0.01
    s_u: float | None = None
    mode: str = "reverse"
    truncate: int | None = None
    fd_radius: float = 0.01
    RENAMED = {"s_l": "inner_lr"}

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.schedule is None:
            self.schedule = "constant" if self.mode == "onestage" else "harmonic"
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}"
            )
        if isinstance(self.mu, bool) or not isinstance(self.mu, (int, float)):
            raise ValueError(f"mu must be a number in [0, 1], got {self.mu!r}")
        if not 0.0 <= self.mu <= 1.0:
            raise ValueError(f"mu must be in [0, 1], got {self.mu!r}")
        self.mu = float(self.mu)
        self.inner_lr = self._lower_step()
        super().__post_init__()
        self.s_u = self.s_l if self.s_u is None else self.s_u
        check_positive("s_u", self.s_u)
        if not (isinstance(self.decay, (int, float)) and 0.0 < self.decay <= 1.0):
            raise ValueError(f"decay must be in (0, 1], got {self.decay!r}")
        check_positive("mu_lr", self.mu_lr)
        check_positive("fd_radius", self.fd_radius)
        if self.mode == "truncated":
            if self.truncate is None:
                raise ValueError("mode='truncated' needs truncate=k (the steps differentiated)")
            check_int("truncate", self.truncate, 0)
        elif self.truncate is not None:
            raise ValueError(f"truncate applies to mode='truncated' only (mode is {self.mode!r})")
        if self.mode == "onestage":
            if self.schedule != "constant":
                raise ValueError(
                    f"mode='onestage' holds α constant at mu; schedule={self.schedule!r} is not "
                    "supported (use schedule='constant' or mode='reverse')"
                )
            if not isinstance(self.optimizer, GradientDescent):
                raise ValueError(
                    "mode='onestage' differentiates one plain gradient step by finite "
                    "differences: it needs inner_optimizer='gd'"
                )

    @property
    def s_l(self) -> float:
        """The paper's name for the step on ∇_y g: ``inner_lr``."""
        return self.inner_lr

    def _lower_step(self) -> float:
        """inner_lr and an optimizer instance's lr name one step: they must agree."""
        given = {"inner_lr": self.inner_lr}
        if not isinstance(self.inner_optimizer, str):
            given["inner_optimizer.lr"] = getattr(self.inner_optimizer, "lr", None)
        given = {k: v for k, v in given.items() if v is not None}
        if len(set(given.values())) > 1:
            named = ", ".join(f"{k}={v!r}" for k, v in given.items())
            raise ValueError(f"inner_lr is the inner optimizer's lr: give one value, got {named}")
        return next(iter(given.values()), DEFAULT_LOWER_STEP)

    def init(self, problem: Problem, x: Tree, y: Tree | None) -> BDAState:
        base = super().init(problem, x, y)
        mu = None
        if self.schedule == "learnable":
            first = next(iter(x.values()))
            mu = torch.tensor(self.mu, dtype=first.dtype, device=first.device)
        return BDAState(y=base.y, y0=base.y0, mu=mu)

    def weights(self, mu: float | Tensor, steps: int) -> list[float | Tensor]:
        """α_0..α_{steps−1} of this method's schedule for aggregation weight ``mu``."""
        if self.schedule == "geometric":
            return [mu * self.decay**k for k in range(steps)]
        if self.schedule == "constant":
            return [mu] * steps
        return [mu / (k + 1) for k in range(steps)]

    def step(self, problem: Problem, x: Tree, state: BDAState) -> tuple[Tree, BDAState]:
        x = tr.detach(x)
        if self.mode == "onestage":
            return self._onestage(problem, x, state), state
        return self._reverse(problem, x, state), state

    def _reverse(self, problem: Problem, x: Tree, state: BDAState) -> Tree:
        steps = self.inner_steps
        k = steps if self.mode == "reverse" else min(self.truncate, steps)
        learnable = state.mu is not None
        mu = state.mu if learnable else self.mu
        weights = self.weights(mu, steps)
        scale = self.s_u / self.s_l
        through_init = problem.init_lower is not None and k == steps
        y_start = self.inner_start(problem, x, state)
        if k < steps:
            head = weights[: steps - k]
            y_start = tr.detach(run_aggregated(problem, x, y_start, head, scale, self.optimizer))
        upper_batch = problem.upper_batch()

        def outer(x_: Tree, mu_: float | Tensor) -> tuple[Tensor, Tree]:
            tail = self.weights(mu_, steps)[steps - k :]
            y0 = problem.init_lower(x_) if through_init else y_start
            y = run_aggregated(problem, x_, y0, tail, scale, self.optimizer)
            with problem.uncounted():
                f = problem.upper_value(x_, y, upper_batch)
            return f, tr.detach(y)

        with problem.unwatched():
            if learnable:
                (hg, d_mu), y_last = grad(outer, argnums=(0, 1), has_aux=True)(x, mu)
                state.mu = torch.clamp(mu - self.mu_lr * d_mu, 0.0, 1.0).detach()
                state.info = {"mu": state.mu}
            else:
                hg, y_last = grad(outer, has_aux=True)(x, mu)
        with_f = sum(1 for a in weights[steps - k :] if not _is_zero(a))
        problem.count("upper_grad")
        problem.count("hvp", k)
        problem.count("mixed", k)
        if with_f:
            problem.count("upper_hvp", with_f)
            problem.count("upper_mixed", with_f)
        problem.watch("lower_grad", y_last)
        problem.watch("upper_grad", hg)
        state.y = y_last
        return hg

    def _onestage(self, problem: Problem, x: Tree, state: BDAState) -> Tree:
        """hg = ∇_x f(x, y_K) − [∇_x ψ(x, y₀ + εv) − ∇_x ψ(x, y₀ − εv)] / (2ε) with
        ψ = α·s_u·f + (1 − α)·s_l·g (= η·φ_α when s_u = s_l = η), v = ∇_y f(x, y_K)."""
        alpha = self.mu
        y0 = self.inner_start(problem, x, state)
        weights = [alpha] * self.inner_steps
        y = run_aggregated(problem, x, y0, weights, self.s_u / self.s_l, self.optimizer)
        upper_batch, lower_batch = problem.upper_batch(), problem.lower_batch()
        f_x, v = problem.grad_upper(x, y, upper_batch)
        # a zero v gives a zero correction; the floor only keeps ε finite
        length = tr.norm(v).clamp_min(torch.finfo(tr.flatten(v).dtype).tiny)
        eps = self.fd_radius / length

        def psi_x(y_: Tree) -> Tree:
            out = tr.zeros_like(x)
            if alpha < 1.0:
                out = tr.axpy((1 - alpha) * self.s_l, problem.grad_lower_x(x, y_, lower_batch), out)
            if alpha > 0.0:
                out = tr.axpy(alpha * self.s_u, problem.grad_upper(x, y_, upper_batch)[0], out)
            return out

        difference = tr.sub(psi_x(tr.axpy(eps, v, y0)), psi_x(tr.axpy(-eps, v, y0)))
        state.y = y
        return tr.axpy(-0.5 / eps, difference, f_x)


def _is_zero(alpha: float | Tensor) -> bool:
    return isinstance(alpha, float) and alpha == 0.0

"""LancBiO's synthetic problem: a smooth, strongly convex but ill-conditioned lower level.

    f(x, y) = 0.1·cos(xᵀdiag(c)y) + ½‖diag(d)x − y‖²
    g(x, y) = γ Σᵢ sin(xᵢ + yᵢ) + log Σᵢ exp(xᵢyᵢ) + ½ yᵀ(diag(e) + G)y

with c ~ U(−5, 5), d ~ U(0.1, 1.1), e ~ U(0, γ) and G = Q diag(linspace(1, κ, n)) Qᵀ, Q from the
QR of a Gaussian matrix. ∇²_yy g ⪰ (1 − γ)I, and its largest eigenvalue is about κ, so inner
gradient steps must be ~1/κ: the linear system of implicit methods is as hard as the inner
problem, which is what Krylov methods (SubBiO, LancBiO) exploit.
Yang, Gao, Yuan, "LancBiO: Dynamic Lanczos-aided Bilevel Optimization via Krylov Subspace",
ICLR 2025 (arXiv 2404.03331).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad, vjp

from bilevel.diagnostics import diagnostic_callbacks
from bilevel.problem import Problem
from bilevel.solve import StepContext
from bilevel.tasks.base import Task, register_task, solver_defaults
from bilevel.tasks.quadratic import random_spd
from bilevel.tree import Tree


@dataclass
class KrylovSyntheticData:
    """The coefficients of one instance, with an exact reference for ∇F."""

    c: Tensor
    d: Tensor
    e: Tensor
    G: Tensor
    gamma: float

    def upper(self, x: Tree, y: Tree) -> Tensor:
        xv, yv = x["x"], y["y"]
        return 0.1 * torch.cos(torch.sum(self.c * xv * yv)) + 0.5 * torch.sum(
            (self.d * xv - yv) ** 2
        )

    def lower(self, x: Tree, y: Tree) -> Tensor:
        xv, yv = x["x"], y["y"]
        return (
            self.gamma * torch.sum(torch.sin(xv + yv))
            + torch.logsumexp(xv * yv, dim=0)
            + 0.5 * yv @ (self.e * yv + self.G @ yv)
        )

    def lower_hessian(self, x: Tensor, y: Tensor) -> Tensor:
        """∇²_yy g in closed form (dense n×n)."""
        p = torch.softmax(x * y, dim=0)
        xp = x * p
        diag = self.e - self.gamma * torch.sin(x + y) + x * xp
        return self.G + torch.diag(diag) - torch.outer(xp, xp)

    def inner_solution(
        self, x: Tree, y0: Tree | None = None, newton_steps: int = 50, tol: float = 1e-12
    ) -> Tree:
        """y*(x) by Newton's method with the exact Hessian (g is strongly convex): stops when
        ‖∇_y g‖ ≤ tol·max(1, ‖∇_y g(y₀)‖). Gradient descent would need ~κ·log(1/tol) steps."""
        xv = x["x"].detach()
        y = (torch.zeros_like(xv) if y0 is None else y0["y"]).detach()
        grad_y = grad(lambda y_: self.lower({"x": xv}, {"y": y_}))
        g = grad_y(y)
        threshold = tol * max(1.0, float(torch.linalg.norm(g)))
        for _ in range(newton_steps):
            if float(torch.linalg.norm(g)) <= threshold:
                break
            y = y - torch.linalg.solve(self.lower_hessian(xv, y), g)
            g = grad_y(y)
        return {"y": y}

    def reference_hypergradient(
        self, x: Tree, y0: Tree | None = None, newton_steps: int = 50, tol: float = 1e-12
    ) -> Tree:
        """∇F(x) = ∇_x f − ∇²_xy g · v with y = y*(x) from :meth:`inner_solution` and
        v = (∇²_yy g)⁻¹ ∇_y f by a dense solve: exact to float precision (one n×n
        factorisation per Newton step; about a second at n = 2000 on two CPU cores)."""
        xv = x["x"].detach()
        ys = self.inner_solution(x, y0, newton_steps, tol)["y"]
        gx, gy = grad(lambda a, b: self.upper({"x": a}, {"y": b}), (0, 1))(xv, ys)
        v = torch.linalg.solve(self.lower_hessian(xv, ys), gy)
        _, pullback = vjp(lambda a: grad(lambda b: self.lower({"x": a}, {"y": b}))(ys), xv)
        return {"x": gx - pullback(v)[0]}

    def value(self, x: Tree, y0: Tree | None = None) -> Tensor:
        """F(x) = f(x, y*(x))."""
        return self.upper(x, self.inner_solution(x, y0))


def krylov_synthetic_data(
    n: int = 2000,
    kappa: float = 1e5,
    gamma: float = 0.5,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
) -> tuple[KrylovSyntheticData, Tensor, Tensor]:
    """Draw one instance and the starting points x₀, y₀ ~ N(0, I); deterministic given seed."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n!r}")
    if not kappa >= 1:
        raise ValueError(f"kappa must be >= 1, got {kappa}")
    if not 0 <= gamma < 1:
        raise ValueError(f"gamma must be in [0, 1) (strong convexity 1 − γ), got {gamma}")
    gen = torch.Generator().manual_seed(seed)

    def uniform(low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(n, generator=gen, dtype=dtype)

    c, d, e = uniform(-5.0, 5.0), uniform(0.1, 1.1), uniform(0.0, gamma)
    G = kappa * random_spd(n, kappa, gen, dtype, "cpu")  # eigenvalues evenly in [1, κ]
    G = 0.5 * (G + G.T)  # exactly symmetric, so HVPs and dense solves agree
    x0 = torch.randn(n, generator=gen, dtype=dtype)
    y0 = torch.randn(n, generator=gen, dtype=dtype)
    data = KrylovSyntheticData(
        c=c.to(device), d=d.to(device), e=e.to(device), G=G.to(device), gamma=gamma
    )
    return data, x0.to(device), y0.to(device)


@register_task("krylov_synthetic")
def krylov_synthetic(
    n: int = 2000,
    kappa: float = 1e5,
    gamma: float = 0.5,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    reference_every: int = 0,
    diagnostics: bool = False,
) -> Task:
    """LancBiO's synthetic task (the paper uses n = 10⁴; the default n = 2000 fits a CPU).

    Callbacks log ``upper_value`` = f(x, y) at every logged step and, on the first and then
    every ``reference_every``-th logged step of a run (0: never; each costs an exact reference,
    see :meth:`KrylovSyntheticData.reference_hypergradient`), ``grad_norm`` = ‖∇F(x̂)‖ and
    ``hypergrad_error`` = ‖hg − ∇F(x̂)‖/‖∇F(x̂)‖ at the point x̂ the estimate hg was taken at
    (the x before that step's update). ``diagnostics=True`` adds the residual ‖A v − b‖ and the
    method's step info (:func:`bilevel.diagnostics.diagnostic_callbacks`).
    ``task.metadata["data"]`` holds the instance.
    """
    if isinstance(reference_every, bool) or not isinstance(reference_every, int):
        raise ValueError(f"reference_every must be an integer >= 0, got {reference_every!r}")
    if reference_every < 0:
        raise ValueError(f"reference_every must be an integer >= 0, got {reference_every!r}")
    data, x0, y0 = krylov_synthetic_data(n, kappa, gamma, seed, dtype, device)
    # ‖∇²_yy g‖ ≤ κ + 2γ + max xᵢ² (G, the sin and e terms, log-sum-exp): safe at x₀
    lipschitz = kappa + 2 * gamma + float(torch.max(x0**2))
    problem = Problem(
        upper=lambda x, y, batch: data.upper(x, y),
        lower=lambda x, y, batch: data.lower(x, y),
    )
    logged = {"calls": 0, "last_step": 0}

    def metrics(ctx: StepContext) -> dict[str, float]:
        if ctx.step <= logged["last_step"]:  # a new run with the same task
            logged["calls"] = 0
        logged["last_step"] = ctx.step
        row = {"upper_value": float(data.upper(ctx.x, ctx.state.y))}
        if reference_every > 0 and logged["calls"] % reference_every == 0:
            true = data.reference_hypergradient(ctx.hg_x, ctx.state.y)["x"]
            norm = torch.linalg.norm(true)
            row["grad_norm"] = float(norm)
            row["hypergrad_error"] = float(torch.linalg.norm(ctx.hg["x"] - true) / norm)
        logged["calls"] += 1
        return row

    return Task(
        name="krylov_synthetic",
        problem=problem,
        x0={"x": x0},
        y0={"y": y0},
        callbacks=[metrics, *(diagnostic_callbacks(problem) if diagnostics else [])],
        metadata={
            "n": n,
            "kappa": kappa,
            "gamma": gamma,
            "seed": seed,
            "lipschitz_estimate": lipschitz,
            "reference_every": reference_every,
            "data": data,
        },
        # the paper: T = 5 inner steps of θ ≈ 1/L, outer step λ = 1; AmIGO-CG uses 5 CG steps;
        # LancBiO's subspace grows ×1.1 every 20 steps up to 80
        method_defaults={
            "inner_steps": 5,
            "inner_lr": 1.0 / lipschitz,
            **solver_defaults(solver_iters=5, solver_lr=1.0 / lipschitz),
            "lancbio": {"fallback_lr": 1.0 / lipschitz, "m": 1, "m_growth": 1.1,
                        "m_period": 20, "m_max": 80},  # fmt: skip
        },
        solve_defaults={"steps": 500, "outer_optimizer": "sgd", "outer_lr": 1.0},
    )

"""BDA's toy problem whose lower level has many solutions (beyond the lower-level singleton).

    f(x, y) = ½‖x − y₂‖² + ½‖y₁ − e‖²,      g(x, y) = ½‖y₁‖² − ⟨x, y₁⟩,      x, y₁, y₂ ∈ Rⁿ

g ignores y₂, so S(x) = argmin_y g = {(x, t) : t ∈ Rⁿ}. The optimistic solution is
x* = y₁* = y₂* = e with f* = 0. A method that assumes a unique inner solution (LLS) and starts
y at 0 never moves y₂ and minimises F(x) = ½‖x‖² + ½‖x − e‖² instead: it converges to x = e/2
(f = n/4). This task documents that failure; BDA's aggregated inner dynamics fix it.
Liu, Mu, Yuan, Zeng, Zhang, "A Generic First-Order Algorithmic Framework for Bi-Level
Programming Beyond Lower-Level Singleton", ICML 2020.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bilevel.problem import Problem
from bilevel.solve import StepContext
from bilevel.tasks.base import Task, register_task, solver_defaults
from bilevel.tree import Tree


def upper_loss(x: Tree, y: Tree) -> Tensor:
    """f(x, y) = ½‖x − y₂‖² + ½‖y₁ − e‖²."""
    return 0.5 * torch.sum((x["x"] - y["y2"]) ** 2) + 0.5 * torch.sum((y["y1"] - 1.0) ** 2)


def lower_loss(x: Tree, y: Tree) -> Tensor:
    """g(x, y) = ½‖y₁‖² − ⟨x, y₁⟩ (independent of y₂)."""
    return 0.5 * torch.sum(y["y1"] ** 2) - torch.sum(x["x"] * y["y1"])


@register_task("lls_toy")
def lls_toy(
    dim: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
) -> Task:
    """The 1-D (``dim=1``) or n-dimensional (the paper uses ``dim=100``) toy problem, from
    x₀ = 0, y₀ = 0.

    Callbacks log ``distance`` = ‖x − x*‖/‖x*‖ and ``upper_value`` = f(x, y) at the updated x
    and the inner iterate. ``metadata`` holds ``x_star`` (= e), ``lls_limit`` (= e/2, where
    every LLS method from y₀ = 0 converges) with its ``lls_distance`` (0.5) and
    ``lls_upper_value`` (n/4). The problem is deterministic; ``seed`` is accepted for a
    uniform task interface and recorded.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
    zeros = torch.zeros(dim, dtype=dtype, device=device)
    x_star = torch.ones(dim, dtype=dtype, device=device)
    problem = Problem(
        upper=lambda x, y, batch: upper_loss(x, y),
        lower=lambda x, y, batch: lower_loss(x, y),
    )

    def metrics(ctx: StepContext) -> dict[str, float]:
        distance = torch.linalg.norm(ctx.x["x"] - x_star) / torch.linalg.norm(x_star)
        return {
            "distance": float(distance),
            "upper_value": float(upper_loss(ctx.x, ctx.state.y)),
        }

    return Task(
        name="lls_toy",
        problem=problem,
        x0={"x": zeros.clone()},
        y0={"y1": zeros.clone(), "y2": zeros.clone()},
        callbacks=[metrics],
        metadata={
            "dim": dim,
            "seed": seed,
            "x_star": x_star,
            "upper_star": 0.0,
            "lls_limit": 0.5 * x_star,
            "lls_distance": 0.5,
            "lls_upper_value": dim / 4,
        },
        # BDA's s_l = inner_lr = 0.5, K = 16; every outer step restarts the inner loop at y₀ = 0
        method_defaults={
            "inner_lr": 0.5,
            "inner_steps": 16,
            "warm_start": False,
            **solver_defaults(solver_lr=0.5),
            "lancbio": {"fallback_lr": 0.5},
            "bda": {"s_u": 0.5, "mu": 0.5},
        },
        solve_defaults={"steps": 2000, "outer_optimizer": "sgd", "outer_lr": 0.5},
    )

"""A quadratic bilevel problem whose lower-level mini-batches have different Hessians.

    g_i(x, y) = ½ yᵀA_i y − yᵀ(B x + c),   A_i = X_iᵀX_i/64 + I/2 (batch i of ``batches``)
    f(x, y) = ½ ‖y − t‖²

The rows of every X_i are scaled so the spectrum spans about [0.5, 50]. Stochastic solvers
(LancBiO on mini-batches, SOBA, stocBiO) see a different matrix per batch; the reference is
the mean problem Ā = mean_i A_i: y* = Ā⁻¹(Bx + c), v* = Ā⁻¹(y* − t) and the hypergradient
Bᵀv*. :func:`one_batch_floor` gives the error of solving one batch's system exactly. Used by
the Krylov tests and ``benchmarks/krylov/minibatch_quadratic.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from bilevel.problem import Problem
from bilevel.tree import Tree


class MinibatchQuadratic(NamedTuple):
    """The problem (``lower_data`` = the batch indices), its point and the mean problem's
    exact v* and hypergradient."""

    problem: Problem
    x: Tree
    y0: Tree
    v_star: Tensor
    hypergradient: Tensor


def _draw(n: int, batches: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The instance's A_i (stacked), B, c, t and x in float64, deterministic given ``seed``."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(1.0, 50**0.5, n, dtype=torch.float64)
    xs = [torch.randn(64, n, generator=g, dtype=torch.float64) * scales for _ in range(batches)]
    a = torch.stack([m.T @ m / 64 + 0.5 * torch.eye(n, dtype=torch.float64) for m in xs])
    b = torch.randn(n, 4, generator=g, dtype=torch.float64)
    c, t = (torch.randn(n, generator=g, dtype=torch.float64) for _ in range(2))
    return a, b, c, t, torch.randn(4, generator=g, dtype=torch.float64)


def _mean_solution(a: Tensor, b: Tensor, c: Tensor, t: Tensor, x0: Tensor) -> Tensor:
    """v* = Ā⁻¹(y* − t) with y* = Ā⁻¹(Bx + c) of the mean problem Ā = mean_i A_i."""
    mean = a.mean(0)
    return torch.linalg.solve(mean, torch.linalg.solve(mean, b @ x0 + c) - t)


def minibatch_quadratic(n: int = 20, batches: int = 8, seed: int = 0) -> MinibatchQuadratic:
    """Draw one instance in float64 (deterministic given ``seed``); |x| = 4, |y| = ``n``."""
    a, b, c, t, x0 = _draw(n, batches, seed)
    problem = Problem(
        upper=lambda x, y, _: 0.5 * torch.sum((y["y"] - t) ** 2),
        lower=lambda x, y, i: 0.5 * y["y"] @ (a[i] @ y["y"]) - y["y"] @ (b @ x["x"] + c),
        lower_data=[torch.tensor(i) for i in range(batches)],
    )
    v_star = _mean_solution(a, b, c, t, x0)
    y0 = {"y": torch.zeros(n, dtype=torch.float64)}
    return MinibatchQuadratic(problem, {"x": x0}, y0, v_star, b.T @ v_star)


def one_batch_floor(n: int = 20, batches: int = 8, seed: int = 0) -> tuple[list[float], float]:
    """Relative hypergradient errors of the exact one-batch solves v_i = A_i⁻¹∇_y f at the mean
    problem's y* (∇_y f = y* − t = Ā v*, hypergradient Bᵀv_i), and of the mean of the v_i:
    the floor of a method that solves one batch's system per cycle (E[A_i⁻¹]Ā v* ≠ v*)."""
    a, b, c, t, x0 = _draw(n, batches, seed)
    v_star = _mean_solution(a, b, c, t, x0)
    rhs = a.mean(0) @ v_star
    solves = torch.linalg.solve(a, rhs.expand(batches, n))  # row i: A_i⁻¹ ∇_y f
    exact = b.T @ v_star
    hypergradients = solves @ b  # row i: Bᵀ v_i
    errors = (hypergradients - exact).norm(dim=1) / exact.norm()
    return errors.tolist(), float((hypergradients.mean(0) - exact).norm() / exact.norm())

"""Random strongly convex quadratic bilevel problems with everything in closed form.

    g(x, y) = ½ yᵀA y − yᵀ(B x + c)                      A ≻ 0, so y*(x) = A⁻¹(B x + c)
    f(x, y) = ½ (y − t)ᵀH (y − t) + yᵀM x + ½ λ‖x‖²        H ⪰ 0

    ∇F(x) = λ x + Mᵀ y* + Bᵀ A⁻¹ (H (y* − t) + M x)

A has eigenvalues spread evenly in [1/condition, 1] (so inner GD with lr 1 is stable and
converges like (1 − 1/condition)^K). λ is chosen so that F is strongly convex (smallest
eigenvalue of its Hessian = ``outer_strength``): the outer problem has one minimiser.
This is the ground truth every method is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bilevel.problem import Problem
from bilevel.solve import StepContext
from bilevel.tasks.base import Task, register_task, solver_defaults
from bilevel.tree import Tree


@dataclass
class QuadraticData:
    """The matrices of one random instance (float tensors on one device)."""

    A: Tensor
    B: Tensor
    c: Tensor
    H: Tensor
    t: Tensor
    M: Tensor
    lam: float

    def y_star(self, x: Tree) -> Tree:
        return {"y": torch.linalg.solve(self.A, self.B @ x["x"] + self.c)}

    def value(self, x: Tree) -> Tensor:
        """F(x) = f(x, y*(x))."""
        return upper_loss(self, x, self.y_star(x))

    def hypergradient(self, x: Tree) -> Tree:
        """The exact ∇F(x)."""
        xv, ys = x["x"], self.y_star(x)["y"]
        v = torch.linalg.solve(self.A, self.H @ (ys - self.t) + self.M @ xv)
        return {"x": self.lam * xv + self.M.T @ ys + self.B.T @ v}

    def outer_hessian(self) -> Tensor:
        """∇²F (constant): Jᵀ H J + Mᵀ J + Jᵀ M + λ I with J = A⁻¹ B = dy*/dx."""
        return _coupling_hessian(self.A, self.B, self.H, self.M) + self.lam * torch.eye(
            self.B.shape[1], dtype=self.B.dtype, device=self.B.device
        )


def _coupling_hessian(A: Tensor, B: Tensor, H: Tensor, M: Tensor) -> Tensor:
    J = torch.linalg.solve(A, B)
    return J.T @ H @ J + M.T @ J + J.T @ M


def upper_loss(d: QuadraticData, x: Tree, y: Tree) -> Tensor:
    r = y["y"] - d.t
    return 0.5 * r @ (d.H @ r) + y["y"] @ (d.M @ x["x"]) + 0.5 * d.lam * (x["x"] @ x["x"])


def lower_loss(d: QuadraticData, x: Tree, y: Tree) -> Tensor:
    return 0.5 * y["y"] @ (d.A @ y["y"]) - y["y"] @ (d.B @ x["x"] + d.c)


def random_spd(n: int, condition: float, generator: torch.Generator, dtype, device) -> Tensor:
    """Q diag(linspace(1/condition, 1)) Qᵀ with Q Haar-random (QR of a Gaussian matrix)."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=dtype))
    eig = torch.linspace(1.0 / condition, 1.0, n, dtype=dtype)
    return ((q * eig) @ q.T).to(device)


def quadratic_data(
    dim_x: int = 5,
    dim_y: int = 10,
    condition: float = 10.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    outer_strength: float = 0.1,
) -> QuadraticData:
    """Draw one instance; deterministic given ``seed`` (independent of the global RNG)."""
    if dim_x < 1 or dim_y < 1:
        raise ValueError(f"dim_x and dim_y must be >= 1, got {dim_x}, {dim_y}")
    if not condition >= 1:
        raise ValueError(f"condition must be >= 1, got {condition}")
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype).to(device)

    A = random_spd(dim_y, condition, gen, dtype, device)
    h_root = randn(dim_y, dim_y) / dim_y**0.5
    B = randn(dim_y, dim_x) / dim_x**0.5
    c = randn(dim_y)
    H = h_root @ h_root.T
    t = randn(dim_y)
    M = randn(dim_y, dim_x) / (dim_x * dim_y) ** 0.5
    lowest = float(torch.linalg.eigvalsh(_coupling_hessian(A, B, H, M).double()).min())
    lam = outer_strength + max(0.0, -lowest)
    return QuadraticData(A=A, B=B, c=c, H=H, t=t, M=M, lam=lam)


@register_task("quadratic")
def quadratic(
    dim_x: int = 5,
    dim_y: int = 10,
    condition: float = 10.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    outer_strength: float = 0.1,
) -> Task:
    """A random quadratic bilevel task; its callback logs the relative hypergradient error
    ``hypergrad_error`` = ‖hg − ∇F(x)‖/‖∇F(x)‖ (at the x hg was estimated at) and the exact
    ``grad_norm`` ‖∇F(x)‖ at the updated x.

    ``task.metadata["data"]`` holds the :class:`QuadraticData` with the closed forms.
    """
    data = quadratic_data(dim_x, dim_y, condition, seed, dtype, device, outer_strength)
    gen = torch.Generator().manual_seed(seed + 1)
    problem = Problem(
        upper=lambda x, y, batch: upper_loss(data, x, y),
        lower=lambda x, y, batch: lower_loss(data, x, y),
    )
    x0 = {"x": torch.randn(dim_x, generator=gen, dtype=dtype).to(device)}
    y0 = {"y": torch.zeros(dim_y, dtype=dtype, device=device)}

    def exact_error(ctx: StepContext) -> dict[str, float]:
        true = data.hypergradient(ctx.hg_x)["x"]
        err = torch.linalg.norm(ctx.hg["x"] - true) / torch.linalg.norm(true)
        grad_norm = torch.linalg.norm(data.hypergradient(ctx.x)["x"])
        return {"hypergrad_error": float(err), "grad_norm": float(grad_norm)}

    return Task(
        name="quadratic",
        problem=problem,
        x0=x0,
        y0=y0,
        callbacks=[exact_error],
        metadata={
            "outer_strength": outer_strength,
            "dim_x": dim_x,
            "dim_y": dim_y,
            "condition": condition,
            "seed": seed,
            "data": data,
        },
        method_defaults={
            "inner_lr": 1.0,
            "inner_steps": 20,
            **solver_defaults(solver_lr=1.0),
            "lancbio": {"fallback_lr": 1.0},
        },
        solve_defaults={"steps": 100, "outer_optimizer": "adam", "outer_lr": 0.05},
    )

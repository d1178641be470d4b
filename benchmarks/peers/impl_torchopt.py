"""TorchOpt 0.7.3.

AID: ``torchopt.diff.implicit.custom_root`` on the optimality condition ∇_y g = 0, with
``linear_solve.solve_cg(maxiter=10, rtol=0)`` (CG from its default v₀ = 0; TorchOpt evaluates
the residual b − A·v₀ with one extra HVP) or ``linear_solve.solve_inv(ns=True, maxiter=10,
alpha=0.05)`` (v = α Σ_{j=0}^{10} (I − αA)^j b: 10 HVPs). TorchOpt linearises the optimality
condition once for the solve and once more for the mixed product.
ITD: the functional differentiable SGD, ``torchopt.FuncOptimizer(torchopt.sgd(lr))``.
"""

from __future__ import annotations

import torch
import torchopt
from protocol import (
    INNER_LR,
    INNER_STEPS,
    NEUMANN_ALPHA,
    OUTER_LR,
    SOLVER_ITERS,
    Data,
    Implementation,
    initial_point,
    lower_loss,
    upper_loss,
)
from torch import Tensor


class TorchOpt(Implementation):
    library = "TorchOpt"

    def __init__(self, method: str, data: Data) -> None:
        super().__init__(method, data)
        x, weight, bias = initial_point(data)
        self._x = x.requires_grad_(True)
        self.y = (weight, bias)
        self.optimizer = torch.optim.Adam([self._x], lr=OUTER_LR)
        if method == "cg":
            solve = torchopt.linear_solve.solve_cg(maxiter=SOLVER_ITERS, rtol=0.0, atol=0.0)
        else:
            solve = torchopt.linear_solve.solve_inv(
                ns=True, maxiter=SOLVER_ITERS, alpha=NEUMANN_ALPHA
            )

        def optimality(y: tuple[Tensor, Tensor], x: Tensor) -> tuple[Tensor, ...]:
            return torch.func.grad(lambda w, b: lower_loss(x, w, b, data), argnums=(0, 1))(*y)

        @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
        def inner_solve(y: tuple[Tensor, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
            # custom_root runs this inside an autograd.Function's forward (grad mode off)
            y, x = tuple(t.detach() for t in y), x.detach()
            step = torch.func.grad(lambda w, b: lower_loss(x, w, b, data), argnums=(0, 1))
            for _ in range(INNER_STEPS):
                y = tuple(t - INNER_LR * g for t, g in zip(y, step(*y), strict=True))
            return y

        self.inner_solve = inner_solve

    @property
    def x(self) -> Tensor:
        return self._x

    def step(self) -> None:
        self.optimizer.zero_grad()
        if self.method == "itd":
            inner = torchopt.FuncOptimizer(torchopt.sgd(lr=INNER_LR))
            y = tuple(t.detach().requires_grad_(True) for t in self.y)
            for _ in range(INNER_STEPS):
                y = inner.step(lower_loss(self._x, *y, self.data), y)
        else:
            y = self.inner_solve(self.y, self._x)
        upper_loss(*y, self.data).backward()
        self.y = tuple(t.detach() for t in y)
        self.hypergradient = self._x.grad
        self.optimizer.step()

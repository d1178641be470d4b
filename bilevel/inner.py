"""Inner dynamics: small functional optimizers for the lower-level variable y.

Each optimizer is ``init(y) -> state`` and ``update(y, grad, state) -> (y, state)`` with no
in-place updates, so the same code runs inside an autograd graph (unrolled differentiation,
forward mode) and outside one. Methods share them through the ``inner_optimizer`` option.
:func:`run_aggregated` drives any of them along BDA's aggregated upper/lower direction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from bilevel import tree as tr
from bilevel.checks import check_positive
from bilevel.problem import Problem
from bilevel.tree import Tree


class InnerOptimizer(Protocol):
    lr: float

    def init(self, y: Tree) -> Any: ...

    def update(self, y: Tree, grad: Tree, state: Any) -> tuple[Tree, Any]: ...


@dataclass(frozen=True)
class GradientDescent:
    """y ← y − lr·∇_y g."""

    lr: float

    def init(self, y: Tree) -> None:
        return None

    def update(self, y: Tree, grad: Tree, state: None) -> tuple[Tree, None]:
        return tr.axpy(-self.lr, grad, y), None


@dataclass(frozen=True)
class Momentum:
    """Heavy-ball: m ← β·m + ∇_y g; y ← y − lr·m (``nesterov``: y ← y − lr·(∇_y g + β·m))."""

    lr: float
    beta: float = 0.9
    nesterov: bool = False

    def init(self, y: Tree) -> Tree:
        return tr.zeros_like(y)

    def update(self, y: Tree, grad: Tree, state: Tree) -> tuple[Tree, Tree]:
        m = tr.axpy(self.beta, state, grad)
        step = tr.axpy(self.beta, m, grad) if self.nesterov else m
        return tr.axpy(-self.lr, step, y), m


@dataclass(frozen=True)
class Adam:
    """Adam (Kingma & Ba, 2015) with bias correction; state (t, m, v)."""

    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def init(self, y: Tree) -> tuple[int, Tree, Tree]:
        return 0, tr.zeros_like(y), tr.zeros_like(y)

    def update(
        self, y: Tree, grad: Tree, state: tuple[int, Tree, Tree]
    ) -> tuple[Tree, tuple[int, Tree, Tree]]:
        t, m, v = state
        t += 1
        m = {k: self.beta1 * m[k] + (1 - self.beta1) * grad[k] for k in grad}
        v = {k: self.beta2 * v[k] + (1 - self.beta2) * grad[k] ** 2 for k in grad}
        c1, c2 = 1 - self.beta1**t, 1 - self.beta2**t
        new_y = {k: y[k] - self.lr * (m[k] / c1) / (torch.sqrt(v[k] / c2) + self.eps) for k in y}
        return new_y, (t, m, v)


INNER_OPTIMIZERS: dict[str, Callable[..., InnerOptimizer]] = {
    "gd": GradientDescent,
    "momentum": Momentum,
    "nesterov": lambda lr: Momentum(lr, nesterov=True),
    "adam": Adam,
}


def make_inner_optimizer(spec: str | InnerOptimizer, lr: float) -> InnerOptimizer:
    """Resolve the ``inner_optimizer`` option: a name in INNER_OPTIMIZERS or an instance."""
    if isinstance(spec, str):
        if spec not in INNER_OPTIMIZERS:
            raise ValueError(
                f"unknown inner_optimizer {spec!r}; choose one of {', '.join(INNER_OPTIMIZERS)} "
                "or pass an object with init(y) and update(y, grad, state)"
            )
        check_positive("inner_lr", lr)
        return INNER_OPTIMIZERS[spec](lr)
    if not (hasattr(spec, "init") and hasattr(spec, "update")):
        raise TypeError("inner_optimizer must be a name or have init(y) and update(y, grad, state)")
    return spec


def run_inner(
    problem: Problem,
    x: Tree,
    y: Tree,
    steps: int,
    optimizer: InnerOptimizer,
    mode: str = "autograd",
) -> Tree:
    """``steps`` optimizer steps on g(x, ·) from y, one fresh lower batch per step, the
    optimizer's state started afresh.

    ``mode`` is how each inner gradient is taken (:meth:`bilevel.oracles.Oracles.grad_lower_y`):
    ``"autograd"`` (default) for a loop that is not differentiated, ``"graph"`` to
    differentiate it with torch.autograd (ITD), ``"func"`` under torch.func transforms.
    """
    return run_inner_with_state(problem, x, y, steps, optimizer, mode=mode)[0]


def run_inner_with_state(
    problem: Problem,
    x: Tree,
    y: Tree,
    steps: int,
    optimizer: InnerOptimizer,
    state: Any = None,
    mode: str = "autograd",
) -> tuple[Tree, Any]:
    """:func:`run_inner` continuing from the optimizer ``state`` (``None``: a fresh one, as
    ``optimizer.init(y)``); returns the last iterate and the optimizer's state."""
    if state is None:
        state = optimizer.init(y)
    # a NaN or Inf in any inner gradient reaches the iterate: watching the last one suffices
    with problem.unwatched():
        for _ in range(steps):
            g = problem.grad_lower_y(x, y, problem.lower_batch(), mode=mode)
            y, state = optimizer.update(y, g, state)
    if steps:
        problem.watch("lower_grad", y)
    return y, state


def run_aggregated(
    problem: Problem,
    x: Tree,
    y: Tree,
    weights: Sequence[float | torch.Tensor],
    upper_scale: float,
    optimizer: InnerOptimizer,
) -> Tree:
    """BDA's aggregated inner dynamics: one ``optimizer`` step per weight α_k along

        d_k = α_k · upper_scale · ∇_y f(x, y_k) + (1 − α_k) · ∇_y g(x, y_k),

    both gradients at y_k, each on a fresh batch (upper and lower). With plain gradient descent
    of step s_l and ``upper_scale = s_u / s_l`` this is y_{k+1} = y_k − α_k s_u ∇_y f −
    (1 − α_k) s_l ∇_y g. A weight that is the Python float 0.0 skips ∇_y f, so an all-zero
    schedule is exactly :func:`run_inner`. Pure and differentiable like :func:`run_inner`.
    """
    state = optimizer.init(y)
    for alpha in weights:
        g = problem.grad_lower_y(x, y, problem.lower_batch())
        if isinstance(alpha, float) and alpha == 0.0:
            direction = g
        else:
            _, f_y = problem.grad_upper(x, y, problem.upper_batch())
            direction = {k: alpha * upper_scale * f_y[k] + (1 - alpha) * g[k] for k in g}
        y, state = optimizer.update(y, direction, state)
    return y

"""Unrolled (iterative) differentiation: reverse mode with optional truncation, and forward mode.

Reverse mode (ITD / RHG) differentiates F(x) = f(x, y_K(x)) through the K inner steps —
Franceschi, Donini, Frasconi, Pontil, "Forward and Reverse Gradient-Based Hyperparameter
Optimization", ICML 2017. Truncated back-propagation through the last k steps (TRHG) —
Shaban, Cheng, Hatch, Boots, "Truncated Back-propagation for Bilevel Optimization", AISTATS 2019.
Forward mode (Franceschi et al. 2017) pushes one tangent per coordinate of x through the loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import jvp, vmap

from bilevel import tree as tr
from bilevel.checks import check_int
from bilevel.inner import run_inner
from bilevel.methods.base import Method, MethodState, register
from bilevel.problem import Problem
from bilevel.tree import Tree


@register("itd")
@dataclass(kw_only=True)
class ITD(Method):
    """Reverse-mode differentiation through the inner loop (RHG), optionally truncated (TRHG).

    ``truncate=k`` back-propagates through the last k of the ``inner_steps`` only. Memory grows
    with the number of differentiated steps; the graph is freed at the end of every step.
    The unrolled loop is recorded by torch.autograd (inner gradients with ``create_graph``) and
    differentiated by one ``backward``: measured faster than ``torch.func.grad`` over the loop
    (benchmarks/peers/README.md), with identical results.
    Oracles: K inner gradients forward, and k HVPs + k mixed products in the backward pass.
    """

    truncate: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.truncate is not None:
            check_int("truncate", self.truncate, 0)

    def step(self, problem: Problem, x: Tree, state: MethodState) -> tuple[Tree, MethodState]:
        x = tr.detach(x)
        steps = self.inner_steps
        k = steps if self.truncate is None else min(self.truncate, steps)
        through_init = problem.init_lower is not None and k == steps
        y_start = self.inner_start(problem, x, state)
        if k < steps:
            y_start = tr.detach(run_inner(problem, x, y_start, steps - k, self.optimizer))
        upper_batch = problem.upper_batch()
        with torch.enable_grad(), problem.unwatched():
            x_ = {name: t.requires_grad_(True) for name, t in x.items()}
            y0 = problem.init_lower(x_) if through_init else y_start
            # torch.autograd differentiates only towards tensors that require grad: a start
            # that does not depend on x becomes a leaf
            y0 = {
                name: t if t.requires_grad else t.detach().requires_grad_(True)
                for name, t in y0.items()
            }
            y = run_inner(problem, x_, y0, k, self.optimizer, mode="graph")
            with problem.uncounted():
                f = problem.upper_value(x_, y, upper_batch)
            grads = torch.autograd.grad(f, list(x_.values()), allow_unused=True)
        hg = {
            name: torch.zeros_like(t) if g is None else g
            for (name, t), g in zip(x_.items(), grads, strict=True)
        }
        y_last = tr.detach(y)
        problem.count("upper_grad")
        problem.count("hvp", k)
        problem.count("mixed", k)
        problem.watch("lower_grad", y_last)
        problem.watch("upper_grad", hg)
        state.y = y_last
        return tr.detach(hg), state


@register("forward")
@dataclass(kw_only=True)
class ForwardMode(Method):
    """Forward-mode differentiation through the inner loop: one tangent per coordinate of x.

    Exact for F(x) = f(x, y_K(x)) like ``itd`` but with memory independent of K; cost grows
    with |x|, so it suits a few hyperparameters. ``batched=True`` pushes all tangents at once
    with ``vmap`` (fast, memory |x|·|y|); ``False`` loops over coordinates.
    Oracles: K inner gradients, K·|x| inner-gradient JVPs, |x| upper-gradient JVPs.
    """

    batched: bool = True

    def step(self, problem: Problem, x: Tree, state: MethodState) -> tuple[Tree, MethodState]:
        x = tr.detach(x)
        y_start = self.inner_start(problem, x, state)
        upper_batch = problem.upper_batch()
        n = tr.size(x)
        lower_batches = [problem.lower_batch() for _ in range(self.inner_steps)]

        def outer(x_: Tree) -> tuple[torch.Tensor, Tree]:
            y = problem.init_lower(x_) if problem.init_lower is not None else y_start
            opt_state = self.optimizer.init(y)
            for batch in lower_batches:
                g = problem.grad_lower_y(x_, y, batch)
                y, opt_state = self.optimizer.update(y, g, opt_state)
            with problem.uncounted():
                f = problem.upper_value(x_, y, upper_batch)
            return f, y

        def directional(e: torch.Tensor) -> tuple[torch.Tensor, Tree]:
            _, df, y = jvp(outer, (x,), (tr.unflatten(e, x),), has_aux=True)
            return df, y

        basis = torch.eye(n, dtype=tr.flatten(x).dtype, device=tr.flatten(x).device)
        with problem.uncounted(), problem.unwatched():
            if self.batched:
                derivs, y_last = vmap(directional, out_dims=(0, None))(basis)
            else:
                columns = [directional(e) for e in basis]
                derivs, y_last = torch.stack([c[0] for c in columns]), columns[0][1]
        problem.count("lower_grad", self.inner_steps)
        problem.count("jvp", self.inner_steps * n)
        problem.count("upper_grad", 1)
        # some of torch's forward-mode rules return float64 tangents for float32 inputs
        hg = tr.unflatten(derivs.to(basis.dtype), x)
        problem.watch("jvp", hg)
        problem.watch("lower_grad", y_last)
        state.y = tr.detach(y_last)
        return hg, state

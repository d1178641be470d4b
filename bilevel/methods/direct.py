"""An ablation, not a hypergradient method: the direct term ∇_x f(x, y_N) alone.

ESJ's estimate is ∇_x f + (1/Q) Σ_q ⟨δ_q, ∇_y f⟩ u_q (Sow, Ji, Liang, "ES-Based Jacobian
Enables Faster Bilevel Optimization", arXiv 2110.07004). With the authors' unit-norm direction
per tensor the second (indirect) term is shrunk by 1/d per tensor, so their ESJ is close to this
method; running it beside ESJ separates what the indirect term adds from what the direct term
does alone (docs/methods/es.md). It drops the response Jacobian entirely: biased by
−(dy*/dx)ᵀ∇_y f, exact only where f does not depend on y.
"""

from __future__ import annotations

from dataclasses import dataclass

from bilevel import tree as tr
from bilevel.inner import run_inner
from bilevel.methods.base import Method, MethodState, register
from bilevel.problem import Problem
from bilevel.tree import Tree


@register("direct")
@dataclass(kw_only=True)
class DirectTerm(Method):
    """Ablation: hg = ∇_x f(x, y_N), the direct term only (no response Jacobian).

    Runs the N inner steps like ESJ (same options, same start) and returns the partial
    gradient of the upper objective in x. Oracles per step: N inner gradients and 1 upper
    gradient.
    """

    def step(self, problem: Problem, x: Tree, state: MethodState) -> tuple[Tree, MethodState]:
        x = tr.detach(x)
        y = run_inner(problem, x, self.inner_start(problem, x, state), self.inner_steps,
                      self.optimizer)  # fmt: skip
        gx, _ = problem.grad_upper(x, y, problem.upper_batch(), mode="autograd")
        state.y = tr.detach(y)
        return gx, state

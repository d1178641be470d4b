"""This library, through its public API: ``bl.Problem`` on the protocol's losses (the
hyper_cleaning task's lower and upper losses, on the same tensors every peer uses), ``bl.method``
and ``method.init`` / ``method.step``, with the outer Adam step written here like every peer's.

AID-CG from v₀ = 0 with warm-started y: ``warm_start`` covers both y and v, and there is no
option for a warm y with a cold v, so the method runs with ``warm_start=False`` and every outer
step starts it from the last inner iterate by ``method.init(problem, x, y_last)`` (one clone of
y per step). The oracle counts of every step are checked against the protocol: 10 inner
gradients, and for cg/neumann exactly 10 HVPs and one mixed product.
"""

from __future__ import annotations

from collections import Counter

import torch
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

import bilevel as bl
from bilevel.methods.implicit import POWER_ITERS


def neumann_terms_for(hvps: int) -> int:
    """The ``solver_iters`` of ``neumann`` that costs ``hvps`` HVPs per step, read from the
    oracle counts of a second step on a 2-d quadratic (the option has counted series terms,
    J − 1 HVPs; the first step adds the step-size check's power iterations)."""
    a = torch.tensor([[2.0, 0.5], [0.5, 1.0]])

    def lower(x, y, batch):
        return 0.5 * y["y"] @ a @ y["y"] - x["x"] @ y["y"]

    def upper(x, y, batch):
        return torch.sum(y["y"] ** 2)

    problem = bl.Problem(upper=upper, lower=lower)
    x, y = {"x": torch.ones(2)}, {"y": torch.zeros(2)}
    for terms in (hvps, hvps + 1):
        method = bl.method("neumann", solver_iters=terms, solver_lr=0.1)
        _, state = method.step(problem, x, method.init(problem, x, y))
        problem.counts.clear()
        method.step(problem, x, state)
        if problem.counts["hvp"] == hvps:
            return terms
    raise RuntimeError(f"no solver_iters of neumann gives {hvps} HVPs")


def make_method(name: str) -> bl.methods.Method:
    inner = {"inner_steps": INNER_STEPS, "inner_lr": INNER_LR, "inner_optimizer": "gd"}
    if name == "cg":
        return bl.method("cg", **inner, solver_iters=SOLVER_ITERS, solver_tol=0.0, warm_start=False)
    if name == "neumann":
        terms = neumann_terms_for(SOLVER_ITERS)
        return bl.method("neumann", **inner, solver_iters=terms, solver_lr=NEUMANN_ALPHA)
    return bl.method("itd", **inner)


EXPECTED = {  # oracle calls per outer step
    "cg": {"lower_grad": INNER_STEPS, "linearize": 1, "hvp": SOLVER_ITERS, "mixed": 1},
    "neumann": {"lower_grad": INNER_STEPS, "linearize": 1, "hvp": SOLVER_ITERS, "mixed": 1},
    "itd": {"lower_grad": INNER_STEPS, "hvp": INNER_STEPS, "mixed": INNER_STEPS},
}


class Bilevel(Implementation):
    library = "bilevel"

    def __init__(self, method: str, data: Data) -> None:
        super().__init__(method, data)
        self.problem = bl.Problem(
            upper=lambda x, y, batch: upper_loss(y["W"], y["b"], data),
            lower=lambda x, y, batch: lower_loss(x["x"], y["W"], y["b"], data),
        )
        x, weight, bias = initial_point(data)
        self.tree = {"x": x.requires_grad_(True)}
        self.bl_method = make_method(method)
        self.state = self.bl_method.init(self.problem, self.tree, {"W": weight, "b": bias})
        self.optimizer = torch.optim.Adam([self.tree["x"]], lr=OUTER_LR)
        self.step_counts: Counter[str] = Counter()
        self.steps_done = 0

    @property
    def x(self) -> Tensor:
        return self.tree["x"]

    def step(self) -> None:
        before = Counter(self.problem.counts)
        if self.method == "cg":  # warm y, cold v (see the module docstring)
            self.state = self.bl_method.init(self.problem, self.tree, self.state.y)
        hg, self.state = self.bl_method.step(self.problem, self.tree, self.state)
        self.step_counts = Counter(self.problem.counts) - before
        expected = dict(EXPECTED[self.method])
        if self.method == "neumann" and self.steps_done == 0:  # the one-off step-size check
            expected["hvp"] += POWER_ITERS
        self.steps_done += 1
        for oracle, n in expected.items():
            if self.step_counts[oracle] != n:
                raise AssertionError(
                    f"bilevel {self.method}: {self.step_counts[oracle]} {oracle!r} oracle calls "
                    f"per step, the protocol needs {n} ({dict(self.step_counts)})"
                )
        self.tree["x"].grad = hg["x"]
        self.hypergradient = hg["x"]
        self.optimizer.step()

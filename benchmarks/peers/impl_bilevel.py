"""This library, through its public API: ``bl.Problem`` on the protocol's losses (the
hyper_cleaning task's lower and upper losses, on the same tensors every peer uses), ``bl.method``
and ``method.init`` / ``method.step``, with the outer Adam step written here like every peer's.

AID-CG from v₀ = 0 with warm-started y: ``solver_warm_start=False`` beside the default
``warm_start``. Neumann's first step adds the step-size check's power iterations (a one-off,
untimed warm-up step here). The oracle counts of every step are checked against the
protocol: 10 inner gradients, and for cg/neumann exactly 10 HVPs and one mixed product.
"""

from __future__ import annotations

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


def make_method(name: str) -> bl.methods.Method:
    inner = {"inner_steps": INNER_STEPS, "inner_lr": INNER_LR, "inner_optimizer": "gd"}
    if name == "cg":
        return bl.method("cg", **inner, solver_iters=SOLVER_ITERS, solver_tol=0.0,
                         solver_warm_start=False)  # fmt: skip
    if name == "neumann":
        return bl.method("neumann", **inner, solver_iters=SOLVER_ITERS, solver_lr=NEUMANN_ALPHA)
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
        self.steps_done = 0
        self.step_counts: dict[str, int] = {}

    @property
    def x(self) -> Tensor:
        return self.tree["x"]

    def step(self) -> None:
        counts = self.problem.counts
        before = dict(counts)  # a plain copy: Counter arithmetic would weigh on the timing
        hg, self.state = self.bl_method.step(self.problem, self.tree, self.state)
        self.step_counts = {o: n - before.get(o, 0) for o, n in counts.items()}
        expected = EXPECTED[self.method]
        if self.method == "neumann" and not self.steps_done:  # the one-off step-size check
            expected = {**expected, "hvp": expected["hvp"] + POWER_ITERS}
        self.steps_done += 1
        if any(self.step_counts.get(o, 0) != n for o, n in expected.items()):
            raise AssertionError(
                f"bilevel {self.method}: oracle calls per step {self.step_counts}, the protocol "
                f"needs {expected}"
            )
        self.tree["x"].grad = hg["x"]
        self.hypergradient = hg["x"]
        self.optimizer.step()

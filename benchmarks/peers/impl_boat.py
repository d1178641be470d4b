"""BOAT 1.1.1 (``boat-torch``): its NGD inner dynamics with the CG, NS (Neumann) or RAD
(reverse mode, ITD) hypergradient, driven by ``boat_torch.Problem.run_iter``.

BOAT writes the implicit system through the fixed-point map Φ(y) = y − lr·∇_y g of the lower
optimizer, so its CG solves lr·A v = ∇_y f (the same hypergradient) and its Neumann series uses
α = the lower optimizer's lr: there is no config key for α. To run the protocol's α = 0.05 with
inner steps at lr 0.5, the lower optimizer is built with lr = α (BOAT's NS reads
``lower_level_opt.defaults["lr"]`` once, when the solver is built) and then set to lr 0.5 in
its param group, which BOAT's inner loop reads on every outer step.
``return_grad=True`` makes ``run_iter`` return the hypergradient instead of stepping; the Adam
step on x is then taken here like every other implementation's. ``run_iter`` also evaluates
both losses once more per step and rewrites its loss log (a JSON file, here a temporary one):
costs of BOAT's API, kept in the timings.
"""

from __future__ import annotations

import os
import tempfile

import boat_torch
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
    lower_from_logits,
    upper_from_logits,
)
from torch import Tensor, nn

NA_OP = {"cg": "CG", "neumann": "NS", "itd": "RAD"}


class Weights(nn.Module):
    """The upper-level model: one logit per training sample."""

    def __init__(self, x: Tensor) -> None:
        super().__init__()
        self.x = nn.Parameter(x)


def _logits(model, inputs: Tensor, params) -> Tensor:
    return model(inputs) if params is None else model(inputs, params=params)


def lower_objective(feed: dict, ul_model: Weights, ll_model, params=None) -> Tensor:
    """BOAT's lower-level loss signature (loaded by BOAT from this module's path)."""
    data: Data = feed["split"]
    weights = ll_model.parameters() if params is None else params
    return lower_from_logits(ul_model.x, _logits(ll_model, data.train, params), weights, data)


def upper_objective(feed: dict, ul_model: Weights, ll_model, params=None) -> Tensor:
    data: Data = feed["split"]
    return upper_from_logits(_logits(ll_model, data.val, params), data)


class Boat(Implementation):
    library = "BOAT"

    def __init__(self, method: str, data: Data) -> None:
        super().__init__(method, data)
        x, weight, bias = initial_point(data)
        self.upper_model = Weights(x)
        self.lower_model = nn.Linear(weight.shape[1], weight.shape[0]).to(data.dtype)
        with torch.no_grad():
            self.lower_model.weight.copy_(weight)
            self.lower_model.bias.copy_(bias)
        solver_lr = NEUMANN_ALPHA if method == "neumann" else INNER_LR
        lower_opt = torch.optim.SGD(self.lower_model.parameters(), lr=solver_lr)
        self.optimizer = torch.optim.Adam(self.upper_model.parameters(), lr=OUTER_LR)
        handle, self.log_path = tempfile.mkstemp(prefix="boat-loss-", suffix=".json")
        os.close(handle)
        config = {
            "fo_op": None,
            "gm_op": ["NGD"],
            "na_op": [NA_OP[method]],
            "lower_level_model": self.lower_model,
            "upper_level_model": self.upper_model,
            "lower_level_var": list(self.lower_model.parameters()),
            "upper_level_var": list(self.upper_model.parameters()),
            "lower_level_opt": lower_opt,
            "upper_level_opt": self.optimizer,
            "lower_iters": INNER_STEPS,
            "device": "cpu",
            "loss_log_path": self.log_path,
            "accumulate_grad": False,
            "copy_last_param": True,  # warm start: the last inner iterate goes back into y
            "return_grad": True,
            "CG": {"k": SOLVER_ITERS, "tolerance": 0.0},  # also NS's k and tolerance
            "GDA": {"alpha_init": 0.0, "alpha_decay": 1.0},
            "RGT": {"truncate_iter": 0},
        }
        losses = {
            "lower_level_loss": {"function": f"{__name__}.lower_objective"},
            "upper_level_loss": {"function": f"{__name__}.upper_objective"},
        }
        self.problem = boat_torch.Problem(config, losses)
        self.problem.build_ll_solver()
        self.problem.build_ul_solver()
        for group in lower_opt.param_groups:  # inner steps at lr 0.5 (see the docstring)
            group["lr"] = INNER_LR
        self.feed = {"split": data}
        self.iteration = 0

    @property
    def x(self) -> Tensor:
        return self.upper_model.x

    def step(self) -> None:
        self.optimizer.zero_grad()
        (hg,), _ = self.problem.run_iter(self.feed, self.feed, self.iteration)
        self.iteration += 1
        self.hypergradient = hg
        self.optimizer.step()

    def __del__(self) -> None:
        if os.path.exists(getattr(self, "log_path", "")):
            os.remove(self.log_path)

"""higher 0.2.1: ITD only (higher has no implicit methods).

``higher.innerloop_ctx`` patches an ``nn.Linear`` and a ``torch.optim.SGD`` into their
differentiable versions; the inner loop runs on the fast weights and the upper loss is
back-propagated through it to x. ``copy_initial_weights=True`` keeps the start out of the
tape; the last fast weights are copied back into the module (warm start).
"""

from __future__ import annotations

import higher
import torch
from protocol import (
    INNER_LR,
    INNER_STEPS,
    OUTER_LR,
    Data,
    Implementation,
    initial_point,
    lower_from_logits,
    upper_from_logits,
)
from torch import Tensor, nn


class Higher(Implementation):
    library = "higher"
    methods = ("itd",)

    def __init__(self, method: str, data: Data) -> None:
        super().__init__(method, data)
        x, weight, bias = initial_point(data)
        self._x = x.requires_grad_(True)
        self.model = nn.Linear(weight.shape[1], weight.shape[0]).to(data.dtype)
        with torch.no_grad():
            self.model.weight.copy_(weight)
            self.model.bias.copy_(bias)
        self.inner_optimizer = torch.optim.SGD(self.model.parameters(), lr=INNER_LR)
        self.optimizer = torch.optim.Adam([self._x], lr=OUTER_LR)

    @property
    def x(self) -> Tensor:
        return self._x

    def step(self) -> None:
        data = self.data
        with higher.innerloop_ctx(self.model, self.inner_optimizer, copy_initial_weights=True) as (
            fmodel,
            diffopt,
        ):
            for _ in range(INNER_STEPS):
                logits = fmodel(data.train)
                diffopt.step(lower_from_logits(self._x, logits, fmodel.parameters(), data))
            (hg,) = torch.autograd.grad(upper_from_logits(fmodel(data.val), data), self._x)
            with torch.no_grad():
                for p, fast in zip(self.model.parameters(), fmodel.parameters(), strict=True):
                    p.copy_(fast)
        self._x.grad = hg
        self.hypergradient = hg
        self.optimizer.step()

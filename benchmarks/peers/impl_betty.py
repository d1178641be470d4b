"""Betty 0.1.1 (``betty-ml``): two problems (upper: x, lower: the linear model) in an ``Engine``;
one outer step is 10 engine steps of the lower problem (``unroll_steps=10``), after which the
upper problem takes its hypergradient and its Adam step.

AID: the lower problem is an ``ImplicitProblem`` of type "cg" (``cg_iterations=10``,
``cg_alpha=1``) or "neumann" (``neumann_iterations=10``, ``neumann_alpha=0.05``: 10 HVPs).
Betty 0.1.1's CG updates the search direction with the old residual (p ← r_old + β p), so its
hypergradient is wrong; leopard-ai/betty@25bcb02 fixes it upstream (not released).
:class:`BettyPatchedCG` runs stock Betty with that one line fixed, in an upper problem whose
``backward`` calls :func:`patched_cg` instead of Betty's ``cg`` (site-packages untouched).
ITD: the lower problem is Betty's functorch ``IterativeProblem`` and the upper problem
differentiates through its unrolled parameters (``first_order=False``). Two things are left to
the user there: the problem's ``forward`` is the stateful module, so the losses call the
functional module with ``self.params`` themselves; and the parameters keep the previous outer
step's graph, and so do the momentum buffers of Betty's differentiable SGD (buf ← 0·buf + grad
even at momentum 0), so ``on_inner_loop_start`` detaches both: without it every backward runs
through all earlier outer steps (the step's cost grows linearly, 0.08 s to 0.38 s over 12 steps
here, and 19 more products with the data per step than hand-written after 2 steps).
"""

from __future__ import annotations

import torch
from betty.configs import Config, EngineConfig
from betty.engine import Engine
from betty.logging.logger_base import get_logger
from betty.problems import ImplicitProblem, IterativeProblem
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

get_logger().setLevel("WARNING")  # Betty logs problem set-up to stdout at INFO


class Weights(nn.Module):
    """The upper-level module: one logit per training sample."""

    def __init__(self, x: Tensor) -> None:
        super().__init__()
        self.x = nn.Parameter(x)


def patched_cg(vector, curr, prev):
    """Betty 0.1.1's ``betty.hypergradient.cg`` (cg_alpha = 1) with the upstream fix: the search
    direction is updated with the new residual."""
    in_loss = curr.training_step_exec(curr.cur_batch)
    in_grad = torch.autograd.grad(in_loss, curr.trainable_parameters(), create_graph=True)
    x = [torch.zeros_like(v) for v in vector]
    r = [v.clone() for v in vector]
    p = [v.clone() for v in vector]
    for _ in range(curr.config.cg_iterations):
        hvp = torch.autograd.grad(in_grad, curr.parameters(), grad_outputs=p, retain_graph=True)
        rr = sum(torch.sum(t * t) for t in r)
        alpha = rr / sum(torch.sum(a * b) for a, b in zip(hvp, p, strict=True))
        x = [xi + alpha * pi for xi, pi in zip(x, p, strict=True)]
        r = [ri - alpha * hi for ri, hi in zip(r, hvp, strict=True)]
        beta = sum(torch.sum(t * t) for t in r) / rr
        p = [ri + beta * pi for ri, pi in zip(r, p, strict=True)]  # the fix: new r, not old r
    implicit = torch.autograd.grad(in_grad, prev.trainable_parameters(), grad_outputs=x)
    return [-g for g in implicit]


class Upper(ImplicitProblem):
    """f on the lower problem's current parameters; records the hypergradient Adam receives."""

    def __init__(self, *args, data: Data, functional_lower: bool, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.data, self.functional_lower = data, functional_lower
        self.hypergradient: Tensor | None = None

    def training_step(self, batch) -> Tensor:
        lower = self.lower
        if self.functional_lower:
            logits = lower.fmodule(lower.params, lower.buffers, self.data.val)
        else:
            logits = lower(self.data.val)
        return upper_from_logits(logits, self.data)

    def get_batch(self):
        return ()

    def custom_optimizer_step(self, *args, **kwargs) -> None:
        self.hypergradient = self.module.x.grad
        self.optimizer.step()


class UpperPatchedCG(Upper):
    """The upper problem of stock Betty, its implicit gradient from :func:`patched_cg`."""

    def backward(self, loss, params, paths, create_graph=False, retain_graph=True, **kwargs):
        direct = torch.autograd.grad(
            loss, params, create_graph=create_graph, retain_graph=True, allow_unused=True
        )
        self.set_grads(params, direct)
        ((_, lower, upper),) = paths
        vector = torch.autograd.grad(loss, lower.trainable_parameters())
        self.set_grads(params, patched_cg(vector, lower, upper))


class LowerImplicit(ImplicitProblem):
    def __init__(self, *args, data: Data, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.data = data

    def training_step(self, batch) -> Tensor:
        logits = self.module(self.data.train)
        return lower_from_logits(self.upper.module.x, logits, self.module.parameters(), self.data)

    def get_batch(self):
        return ()


class LowerIterative(IterativeProblem):
    def __init__(self, *args, data: Data, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.data = data

    def training_step(self, batch) -> Tensor:
        logits = self.fmodule(self.params, self.buffers, self.data.train)
        return lower_from_logits(self.upper.module.x, logits, self.params, self.data)

    def get_batch(self):
        return ()

    def on_inner_loop_start(self) -> None:
        """Cut the graph of the previous outer step: the parameters, and the momentum buffers of
        Betty's differentiable SGD, which chain buf ← 0·buf + grad even at momentum 0."""
        self.params = tuple(p.detach().requires_grad_(True) for p in self.params)
        for state in self.optimizer.state:
            if state and state.get("momentum_buffer") is not None:
                state["momentum_buffer"] = state["momentum_buffer"].detach()


class Betty(Implementation):
    library = "Betty"
    upper_class: type[Upper] = Upper

    def __init__(self, method: str, data: Data) -> None:
        super().__init__(method, data)
        x, weight, bias = initial_point(data)
        upper_module = Weights(x)
        lower_module = nn.Linear(weight.shape[1], weight.shape[0]).to(data.dtype)
        with torch.no_grad():
            lower_module.weight.copy_(weight)
            lower_module.bias.copy_(bias)
        itd = method == "itd"
        self.upper = self.upper_class(
            name="upper",
            config=Config(first_order=not itd, retain_graph=True),  # direct grad, then implicit
            module=upper_module,
            optimizer=torch.optim.Adam(upper_module.parameters(), lr=OUTER_LR),
            device="cpu",
            data=data,
            functional_lower=itd,
        )
        lower_options = {
            "cg": {"type": "cg", "cg_iterations": SOLVER_ITERS, "cg_alpha": 1.0},
            "neumann": {
                "type": "neumann",
                "neumann_iterations": SOLVER_ITERS,
                "neumann_alpha": NEUMANN_ALPHA,
            },
            "itd": {"type": "darts", "retain_graph": True},  # type unused: ITD needs no solve
        }[method]
        self.lower = (LowerIterative if itd else LowerImplicit)(
            name="lower",
            config=Config(unroll_steps=INNER_STEPS, **lower_options),
            module=lower_module,
            optimizer=torch.optim.SGD(lower_module.parameters(), lr=INNER_LR),
            device="cpu",
            data=data,
        )
        self.engine = Engine(
            problems=[self.upper, self.lower],
            config=EngineConfig(train_iters=INNER_STEPS),
            dependencies={"u2l": {self.upper: [self.lower]}, "l2u": {self.lower: [self.upper]}},
        )
        self.engine.train()

    @property
    def x(self) -> Tensor:
        return self.upper.module.x

    def step(self) -> None:
        for _ in range(INNER_STEPS):
            self.engine.global_step += 1
            self.engine.train_step()
        self.hypergradient = self.upper.hypergradient


class BettyPatchedCG(Betty):
    library = "Betty (CG patched)"
    methods = ("cg",)
    upper_class = UpperPatchedCG

"""The hand-written torch.autograd loop: the baseline every ratio is taken against.

AID: one linearisation of ∇_y g per step (a gradient with ``create_graph=True``), every HVP
and the mixed product a ``torch.autograd.grad`` through it with ``retain_graph=True``.
ITD: autograd through the unrolled inner loop. Run in float64 it is the correctness reference.
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


def _dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    return sum(torch.sum(u * v) for u, v in zip(a, b, strict=True))


def conjugate_gradient(hvp, b: list[Tensor], iters: int) -> list[Tensor]:
    """``iters`` CG iterations on A v = b from v₀ = 0 (``iters`` HVPs, no tolerance test)."""
    v = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in b]
    rr = _dot(r, r)
    for _ in range(iters):
        ap = hvp(p)
        alpha = rr / _dot(p, ap)
        v = [vi + alpha * pi for vi, pi in zip(v, p, strict=True)]
        r = [ri - alpha * ai for ri, ai in zip(r, ap, strict=True)]
        rr_new = _dot(r, r)
        p = [ri + (rr_new / rr) * pi for ri, pi in zip(r, p, strict=True)]
        rr = rr_new
    return v


def neumann(hvp, b: list[Tensor], alpha: float, hvps: int) -> list[Tensor]:
    """v = α Σ_{j=0}^{hvps} (I − αA)^j b: ``hvps`` HVPs."""
    term, total = b, list(b)
    for _ in range(hvps):
        term = [t - alpha * h for t, h in zip(term, hvp(term), strict=True)]
        total = [s + t for s, t in zip(total, term, strict=True)]
    return [alpha * s for s in total]


class HandWritten(Implementation):
    library = "hand-written"

    def __init__(self, method: str, data: Data) -> None:
        super().__init__(method, data)
        x, weight, bias = initial_point(data)
        self._x = x.requires_grad_(True)
        self.y = [weight, bias]
        self.optimizer = torch.optim.Adam([self._x], lr=OUTER_LR)

    @property
    def x(self) -> Tensor:
        return self._x

    def step(self) -> None:
        hg = self._itd() if self.method == "itd" else self._aid()
        self._x.grad = hg
        self.hypergradient = hg
        self.optimizer.step()

    def _inner(self) -> list[Tensor]:
        x, y = self._x.detach(), [t.detach().requires_grad_(True) for t in self.y]
        for _ in range(INNER_STEPS):
            grads = torch.autograd.grad(lower_loss(x, *y, self.data), y)
            with torch.no_grad():
                y = [t - INNER_LR * g for t, g in zip(y, grads, strict=True)]
            y = [t.requires_grad_(True) for t in y]
        return y

    def _aid(self) -> Tensor:
        y = self._inner()
        self.y = [t.detach() for t in y]
        gy = list(torch.autograd.grad(upper_loss(*y, self.data), y))
        x = self._x.detach().requires_grad_(True)
        grad_y = torch.autograd.grad(lower_loss(x, *y, self.data), y, create_graph=True)

        def hvp(v: list[Tensor]) -> list[Tensor]:
            return list(torch.autograd.grad(grad_y, y, v, retain_graph=True))

        if self.method == "cg":
            v = conjugate_gradient(hvp, gy, SOLVER_ITERS)
        else:
            v = neumann(hvp, gy, NEUMANN_ALPHA, SOLVER_ITERS)
        (mixed,) = torch.autograd.grad(grad_y, x, v)
        return -mixed

    def _itd(self) -> Tensor:
        y = [t.detach().requires_grad_(True) for t in self.y]
        for _ in range(INNER_STEPS):
            grads = torch.autograd.grad(lower_loss(self._x, *y, self.data), y, create_graph=True)
            y = [t - INNER_LR * g for t, g in zip(y, grads, strict=True)]
        (hg,) = torch.autograd.grad(upper_loss(*y, self.data), self._x)
        self.y = [t.detach() for t in y]
        return hg


class HandWrittenReplica(HandWritten):
    """The same loop, timed as an implementation of its own: its ratio to the baseline is an A/A
    comparison, so its distance from 1 is the resolution of every ratio in the table."""

    library = "hand-written (replica)"

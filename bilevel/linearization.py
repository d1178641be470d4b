"""The lower gradient linearised at one point: every HVP and mixed product there is one pullback.

At a fixed (x, y, batch) an implicit or Krylov step takes many products with the same
Jacobian of (x, y) ↦ ∇_y g(x, y): J HVPs ∇²_yy g·v in its linear solve and one mixed product
∇²_xy g·v at the end. Rebuilding ∇_y g for each product repeats a forward and a backward pass
of the lower loss every time. :class:`LowerLinearization` builds the graph of ∇_y g once (one
forward, one backward with ``create_graph``) and answers every product by a pullback through
that graph, restricted to the inputs asked for: an HVP never differentiates towards x, a
mixed product never towards y.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from bilevel.grad_mode import grad_enabled
from bilevel.tree import Tree


class LowerLinearization:
    """(x, y) ↦ ∇_y g(x, y) linearised at one point, through torch.autograd.

    Args:
        loss: ``loss(x, y) -> scalar`` with the batch already bound.
        x, y: the point (detached here: the linearisation is a constant of the outer graph);
            x may be a tree or a tensor (a representation z of the outer variable).
        reduce: applied to every product (the cross-rank mean under data sharding).
        record: ``record(oracle, out)`` counts and watches each product ("hvp", "mixed").
        pull: maps a derivative w.r.t. ``x`` on to the outer variable (a representation's
            pullback); ``None`` when ``x`` is the outer variable itself.

    ``grad`` is ∇_y g at the point, a by-product of building the graph (detached on first
    use: AID needs only the products). Not usable under ``torch.func`` transforms (vmap,
    grad): those use the oracles' transform-safe products.
    """

    def __init__(
        self,
        loss: Callable[[Tree, Tree], Tensor],
        x: Tree,
        y: Tree,
        reduce: Callable[[Tree], Tree],
        record: Callable[[str, Tree], None],
        pull: Callable[[Any], Tree] | None = None,
    ) -> None:
        self._reduce, self._record, self._pull = reduce, record, pull
        self._tensor_x = isinstance(x, Tensor)
        with grad_enabled():
            self._x = {k: v.detach().requires_grad_(True) for k, v in _as_tree(x).items()}
            self._y = {k: v.detach().requires_grad_(True) for k, v in y.items()}
            value = loss(self._x["z"] if self._tensor_x else self._x, self._y)
            grads = torch.autograd.grad(
                value, list(self._y.values()), create_graph=True, allow_unused=True
            )
        # products flow only through the components of ∇_y g that depend on x or y; the lists
        # autograd takes are built once (products run in tight loops). Autograd gives each
        # gradient its input's dtype.
        self._grads = grads
        self._outputs = [
            (k, g) for k, g in zip(self._y, grads, strict=True) if g is not None and g.requires_grad
        ]
        self._output_tensors = [g for _, g in self._outputs]
        self._leaves = {"x": list(self._x.values()), "y": list(self._y.values())}

    @cached_property
    def grad(self) -> Tree:
        """∇_y g at the point (a tree like y, no graph)."""
        grad = {
            k: torch.zeros_like(v) if g is None else g.detach()
            for (k, v), g in zip(self._y.items(), self._grads, strict=True)
        }
        return self._reduce(grad)

    def hvp(self, v: Tree) -> Tree:
        """∇²_yy g · v (a tree like y)."""
        return self._pullback("hvp", v, "y")

    def mixed(self, v: Tree) -> Tree:
        """∇²_xy g · v = ∇_x ⟨∇_y g, v⟩ (a tree like the outer variable)."""
        return self._pullback("mixed", v, "x")

    def reaches_x(self) -> bool:
        """Whether ∇_y g depends on the outer variable at all (structurally, through the
        graph: one uncounted backward pass; False means every mixed product is zero)."""
        if not self._outputs:
            return False
        outputs = self._output_tensors
        grads = torch.autograd.grad(
            outputs,
            self._leaves["x"],
            [torch.ones_like(g) for g in outputs],
            retain_graph=True,
            allow_unused=True,
        )
        return any(g is not None for g in grads)

    def _pullback(self, oracle: str, v: Tree, towards: str) -> Tree:
        """The product of ``v`` with the derivative of ∇_y g towards ``"x"`` or ``"y"``."""
        inputs = self._x if towards == "x" else self._y
        if self._outputs:
            cotangents = [_as_dtype(v[k], g.dtype) for k, g in self._outputs]
            grads = torch.autograd.grad(
                self._output_tensors,
                self._leaves[towards],
                cotangents,
                retain_graph=True,
                allow_unused=True,
            )
        else:
            grads = [None] * len(inputs)
        # autograd gives every gradient its input's dtype
        out = {
            k: torch.zeros_like(t) if g is None else g
            for (k, t), g in zip(inputs.items(), grads, strict=True)
        }
        if towards == "x":  # towards the outer variable: through the representation
            out = out["z"] if self._tensor_x else out
            out = out if self._pull is None else self._pull(out)
        out = self._reduce(out)
        self._record(oracle, out)
        return out


def _as_tree(x: Tree | Tensor) -> Tree:
    return {"z": x} if isinstance(x, Tensor) else x


def _as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype`` (no dispatch when it already is: products run in tight loops)."""
    return t if t.dtype == dtype else t.to(dtype)

"""Tree arithmetic: variables are ``dict[str, Tensor]`` and every method works on them.

Every function here is pure (no in-place updates) so that it can run inside an autograd graph
(unrolled differentiation) and under ``torch.func`` transforms.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

Tree = dict[str, Tensor]


def check_tree(tree: object, name: str) -> Tree:
    """Validate that ``tree`` is a non-empty dict of floating tensors; return it as a dict.

    Raises ``TypeError``/``ValueError`` naming ``name`` and the offending key.
    """
    if not isinstance(tree, Mapping):
        raise TypeError(
            f"{name} must be a dict[str, Tensor] (use bilevel.params(module) for an nn.Module), "
            f"got {type(tree).__name__}"
        )
    if len(tree) == 0:
        raise ValueError(f"{name} is an empty tree: it needs at least one tensor")
    for key, value in tree.items():
        if not isinstance(key, str):
            raise TypeError(f"{name} keys must be strings, got {key!r}")
        if not isinstance(value, Tensor):
            raise TypeError(f"{name}[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"{name}[{key!r}] must be a floating tensor, got dtype {value.dtype}")
    return dict(tree)


def add(a: Tree, b: Tree) -> Tree:
    return {k: a[k] + b[k] for k in a}


def sub(a: Tree, b: Tree) -> Tree:
    return {k: a[k] - b[k] for k in a}


def scale(a: Tree, s: float | Tensor) -> Tree:
    return {k: v * s for k, v in a.items()}


def axpy(alpha: float | Tensor, x: Tree, y: Tree, sign: float = 1.0) -> Tree:
    """Return ``sign * alpha * x + y``, one fused op per leaf (``torch.add``, or
    ``torch.addcmul`` for a tensor alpha, whose negation ``sign=-1`` saves)."""
    if isinstance(alpha, Tensor):
        return {k: torch.addcmul(y[k], alpha, x[k], value=sign) for k in x}
    return {k: torch.add(y[k], x[k], alpha=sign * alpha) for k in x}


def dot(a: Tree, b: Tree) -> Tensor:
    """Inner product summed over all leaves (a 0-dim tensor, no host sync).

    ``torch.dot`` (on flat views beyond 1-D) where a pair of leaves shares a dtype — no product
    tensor, one pass, fewer dispatches: solvers take two per iteration — else sum(u·v)
    (type promotion)."""
    total = None
    for k, u in a.items():
        v = b[k]
        if u.dtype != v.dtype:
            term = torch.sum(u * v)
        elif u.dim() == 1:
            term = torch.dot(u, v)
        else:
            flat = u.reshape(-1)
            term = torch.dot(flat, flat if v is u else v.reshape(-1))
        total = term if total is None else total + term
    return total


def norm(a: Tree) -> Tensor:
    return torch.sqrt(dot(a, a))


def device(a: Tree) -> torch.device:
    """The device of the tree's tensors (that of its first leaf)."""
    return next(iter(a.values())).device


def zeros_like(a: Tree) -> Tree:
    return {k: torch.zeros_like(v) for k, v in a.items()}


def randn_like(a: Tree, generator: torch.Generator | None = None) -> Tree:
    return {
        k: torch.randn(v.shape, dtype=v.dtype, device=v.device, generator=generator)
        for k, v in a.items()
    }


def detach(a: Tree) -> Tree:
    return {k: v.detach() for k, v in a.items()}


def clone(a: Tree) -> Tree:
    """Detached copies: the caller's tensors are never aliased or modified."""
    return {k: v.detach().clone() for k, v in a.items()}


def size(a: Tree) -> int:
    """Number of scalars in the tree."""
    return sum(math.prod(v.shape) for v in a.values())


def flatten(a: Tree) -> Tensor:
    """Concatenate all leaves into one vector (key order of the dict)."""
    return torch.cat([v.reshape(-1) for v in a.values()])


def unflatten(vector: Tensor, like: Tree) -> Tree:
    """Inverse of :func:`flatten` with the shapes of ``like``."""
    out, start = {}, 0
    for k, v in like.items():
        n = v.numel()
        out[k] = vector[start : start + n].reshape(v.shape)
        start += n
    return out


def where(condition: Tensor, a: Tree, b: Tree) -> Tree:
    """Entrywise ``a`` where the 0-dim ``condition`` holds, else ``b`` (no host sync)."""
    return {k: torch.where(condition, a[k], b[k]) for k in a}


def lerp(a: Tree, b: Tree, weight: Tensor | float) -> Tree:
    """a + weight·(b − a) per leaf (``torch.lerp``: exact at weight 0 and 1 for finite a, b;
    one vectorised op, where ``torch.where`` on a 0-dim condition is an elementwise loop)."""
    return {k: torch.lerp(a[k], b[k], weight) for k in a}


def all_finite(a: Tree) -> Tensor:
    """0-dim bool tensor: every entry of every leaf is finite (no host sync)."""
    flags = [torch.isfinite(v).all() for v in a.values()]
    return torch.stack(flags).all()

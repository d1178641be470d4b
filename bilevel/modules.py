"""Using ``nn.Module`` models as inner (or outer) variables.

The variable is the module's parameter tree (:func:`params`); the module is evaluated with it
through ``torch.func.functional_call`` (:func:`functional`). Buffers stay the module's own
tensors, so nothing is copied that could silently drift away from the module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bilevel.tree import Tree


def params(module: nn.Module) -> Tree:
    """The trainable parameters of ``module`` as a detached tree (a starting point for x or y)."""
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def buffers(module: nn.Module) -> Tree:
    """The module's own buffers (not copies), to pass next to a parameter tree."""
    return dict(module.named_buffers())


def functional(module: nn.Module) -> Callable[..., Any]:
    """``apply(tree, *args, **kwargs)``: the module's forward with parameters from ``tree``.

    BatchNorm layers that track running statistics in training mode update them in place,
    which cannot happen inside the hypergradient transforms (grad/jvp/vmap); rather than let
    the statistics silently diverge from the module, this raises. Use ``module.eval()`` (the
    running statistics are then read, not written) or
    ``torch.func.replace_all_batch_norm_modules_(module)`` (batch statistics only).
    """
    for name, sub in module.named_modules():
        if (
            isinstance(sub, nn.modules.batchnorm._BatchNorm)
            and sub.training
            and (sub.track_running_stats)
        ):
            raise ValueError(
                f"{name or type(module).__name__} is a BatchNorm layer tracking running statistics "
                "in training mode; its in-place updates cannot run inside hypergradient "
                "transforms. Call module.eval() or "
                "torch.func.replace_all_batch_norm_modules_(module) first"
            )
    own_buffers = buffers(module)

    def apply(tree: Tree, *args: Any, **kwargs: Any) -> Tensor:
        return functional_call(module, (tree, own_buffers), args, kwargs)

    return apply


def hyperparameters(
    module: nn.Module, per: str = "tensor", value: float = 0.0, only: str | None = None
) -> Tree:
    """A hyperparameter tree matching ``module``'s parameters, filled with ``value``.

    ``per="tensor"``: one scalar per parameter tensor (e.g. one weight decay per layer);
    ``per="weight"``: one per scalar weight, shaped like the parameter (e.g. per-weight decay).
    Keys are the parameter names, dtype and device the parameters'; ``only`` keeps names that
    contain this substring (``"weight"``: leave biases out). Use it as x with a lower loss such
    as ``loss + sum(torch.sum(x[k].exp() * y[k] ** 2) for k in x)``.
    """
    if per not in ("tensor", "weight"):
        raise ValueError(f"per must be 'tensor' or 'weight', got {per!r}")
    tree = {}
    for name, p in module.named_parameters():
        if only is not None and only not in name:
            continue
        shape = () if per == "tensor" else p.shape
        tree[name] = torch.full(shape, float(value), dtype=p.dtype, device=p.device)
    if not tree:
        raise ValueError(f"module has no parameters{'' if only is None else f' matching {only!r}'}")
    return tree

"""The bilevel problem: the loss specification and its validation.

    min_x F(x) = f(x, y*(x)),   y*(x) in argmin_y g(x, y)

``Problem`` holds the user's ``upper`` (f) and ``lower`` (g) losses and their data. Methods never
call the losses directly: they go through the counted oracles (:mod:`bilevel.oracles`) and draw
batches from the streams (:mod:`bilevel.streams`), the two base classes of ``Problem``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from bilevel import tree as tr
from bilevel.checks import check_reiterable
from bilevel.oracles import ORACLES, Loss, NonFiniteError, Oracles, Representation
from bilevel.streams import BatchStreams
from bilevel.tree import Tree

__all__ = ["ORACLES", "Loss", "NonFiniteError", "Problem", "validate"]


class Problem(BatchStreams, Oracles):
    """A bilevel problem: upper loss f(x, y, batch), lower loss g(x, y, batch).

    Args:
        upper: ``f(x, y, batch) -> scalar tensor`` (validation / outer objective).
        lower: ``g(x, y, batch) -> scalar tensor`` (training / inner objective).
        upper_data, lower_data: iterables of batches, cycled forever; ``None`` means
            deterministic full-batch losses (``batch`` is then ``None``).
        task_data: iterable of task batches (e.g. meta-batches of few-shot episodes), cycled;
            one is drawn per outer step (:meth:`next_task`) and passed as ``batch`` to both
            losses for that whole step, unless upper_data / lower_data are given.
        init_lower: optional ``init_lower(x) -> y0``: the inner variable starts from a function
            of x (MAML-style meta-initialisation); methods differentiate through it.
        check_finite: flag NaN/Inf in oracle outputs (checked once per outer step, no per-call
            host sync); raise :class:`NonFiniteError` naming the oracle.
        lower_autocast: run the lower loss under ``torch.autocast`` with this dtype (e.g.
            ``torch.bfloat16``) in every lower-level oracle (inner gradients, HVPs, mixed
            products): faster inner loops on hardware with bf16 units, at the precision cost
            measured in tests/test_autocast.py. Results keep y's dtype.
        lower_representation, upper_representation: ``φ(x, batch) -> z`` (a tensor or a tree)
            when that loss depends on x only through z, e.g. the features of a backbone x on
            the batch's inputs. The loss then receives z in place of x: ``lower(z, y, batch)``.
            z is computed once per (x, batch) — not once per inner gradient or product — and
            derivatives w.r.t. x are pulled back through φ once. Results equal those of the
            loss written with φ inside.
    """

    def __init__(
        self,
        upper: Loss,
        lower: Loss,
        upper_data: Iterable | None = None,
        lower_data: Iterable | None = None,
        init_lower: Callable[[Tree], Tree] | None = None,
        check_finite: bool = True,
        task_data: Iterable | None = None,
        lower_autocast: torch.dtype | None = None,
        lower_representation: Representation | None = None,
        upper_representation: Representation | None = None,
    ) -> None:
        for name, fn in (("upper", upper), ("lower", lower)):
            if not callable(fn):
                raise TypeError(f"{name} must be callable f(x, y, batch) -> scalar tensor")
        for name, fn in (
            ("init_lower", init_lower),
            ("lower_representation", lower_representation),
            ("upper_representation", upper_representation),
        ):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        if lower_autocast is not None and not (
            isinstance(lower_autocast, torch.dtype) and lower_autocast.is_floating_point
        ):
            raise TypeError(f"lower_autocast must be a float torch.dtype, got {lower_autocast!r}")
        self.upper = upper
        self.lower = lower
        self.init_lower = init_lower
        # set by bilevel.distributed.shard_tasks: sums this rank's share of a value over ranks
        self.combine: Callable[[Tree], Tree] | None = None
        self._init_streams(lower_data, upper_data, task_data)
        self._init_oracles(check_finite, lower_autocast, lower_representation, upper_representation)

    def initial_y(self, x: Tree, y: Tree | None) -> Tree:
        """The inner start: ``init_lower(x)`` when given (differentiable in x), else ``y``."""
        if self.init_lower is not None:
            return self.init_lower(x)
        if y is None:
            raise ValueError("y is required when the problem has no init_lower")
        return y


def validate(problem: Problem, x: object, y: object) -> tuple[Tree, Tree]:
    """Check the problem and the starting point once, before any method runs.

    Catches the mistakes that otherwise surface as deep tracebacks or silent garbage: variables
    that are not trees of floating tensors, non-scalar or non-finite losses, a lower loss that
    depends on no inner variable, and an ``init_lower`` whose output does not match ``y``.
    A lower loss independent of *part* of y is legal (zero gradient there).
    """
    check_reiterable(problem)
    x = tr.check_tree(x, "x")
    if problem.init_lower is not None:
        y0 = tr.check_tree(problem.init_lower(x), "init_lower(x)")
        if y is not None:
            y = tr.check_tree(y, "y")
            _check_same_structure(y0, y, "init_lower(x)", "y")
        y = y0
    else:
        if y is None:
            raise ValueError("y (the initial inner variable) is required without init_lower")
        y = tr.check_tree(y, "y")
    task_batch = _peek(problem.task_data)
    lower_batch = task_batch if problem.lower_data is None else _peek(problem.lower_data)
    upper_batch = task_batch if problem.upper_data is None else _peek(problem.upper_data)
    y_req = {k: v.detach().requires_grad_(True) for k, v in y.items()}
    x_det = tr.detach(x)
    with problem.uncounted():
        z_lower = problem._at("lower", x_det, lower_batch)[0]
        z_upper = problem._at("upper", x_det, upper_batch)[0]
    g = problem._lower_at(z_lower, y_req, lower_batch)
    f = problem._upper_at(z_upper, tr.detach(y), upper_batch)
    for name, value in (("lower", g), ("upper", f)):
        if not bool(torch.isfinite(value.detach())):
            raise NonFiniteError(f"the {name} loss is {value.item()} at the starting point")
    used = g.requires_grad and any(
        d is not None for d in torch.autograd.grad(g, list(y_req.values()), allow_unused=True)
    )
    if not used:
        raise ValueError(
            "the lower loss does not depend on any inner variable y: nothing to optimize in the "
            "inner problem (check that lower(x, y, batch) uses y)"
        )
    return x, y


def _check_same_structure(a: Tree, b: Tree, name_a: str, name_b: str) -> None:
    if a.keys() != b.keys():
        raise ValueError(f"{name_a} has keys {sorted(a)} but {name_b} has keys {sorted(b)}")
    for k in a:
        if a[k].shape != b[k].shape:
            raise ValueError(
                f"{name_a}[{k!r}] has shape {tuple(a[k].shape)} but {name_b}[{k!r}] has shape "
                f"{tuple(b[k].shape)}"
            )


def _peek(data: Iterable | None) -> Any:
    if data is None:
        return None
    try:
        return next(iter(data))
    except StopIteration:
        raise ValueError("a data iterable of the problem is empty") from None

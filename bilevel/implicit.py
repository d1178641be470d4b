"""``bl.implicit``: implicit gradients of any inner solver, through ordinary autograd.

Decorate a solver ``fn(x, *args) -> y`` (closed form, L-BFGS, a loop of one's own) with the
lower objective g whose minimiser it returns; the decorated function returns the same y, but
differentiable with respect to the tensors of x that require grad. At a stationary point
∇_y g(x, y) = 0 the implicit function theorem gives the vector-Jacobian product

    ∂L/∂x = −∇²_xy g · v,    with   (∇²_yy g + ridge·I) · v = ∂L/∂y,

so backward solves one linear system with a solver of :mod:`bilevel.linalg` (Hessian-vector
products by forward-over-reverse ``torch.func``, never the Hessian) and applies one mixed
product. How y was found does not matter, only that it is (close to) a minimiser.
The idea is that of JAXopt's ``custom_root`` (Blondel et al., "Efficient and Modular Implicit
Differentiation", NeurIPS 2022) and TorchOpt's ``custom_root``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp

from bilevel import tree as tr
from bilevel.checks import check_int, reject_unknown_options
from bilevel.linalg import SolveInfo, conjugate_gradient, fixed_point, neumann
from bilevel.tree import Tree

SOLVERS = ("cg", "neumann", "fixed_point")
# the options each solver reads; solver_iters counts Hessian-vector products for every solver
SOLVER_OPTIONS = {
    "cg": ("solver_iters", "solver_tol", "ridge"),
    "neumann": ("solver_iters", "solver_lr", "ridge"),
    "fixed_point": ("solver_iters", "solver_lr", "ridge"),
}
DEFAULTS = {"solver_iters": 100, "solver_tol": 1e-10, "solver_lr": 0.1, "ridge": 0.0}

Variable = Tree | Tensor


@dataclass(frozen=True)
class _Spec:
    """What backward needs besides the tensors: the lower objective, its extra arguments, the
    tree layout and the linear solver."""

    lower: Callable[..., Tensor]
    args: tuple[Any, ...]
    x_keys: tuple[str, ...]
    y_keys: tuple[str, ...]
    x_is_tensor: bool
    y_is_tensor: bool
    solve: Callable[[Callable[[Tree], Tree], Tree], tuple[Tree, SolveInfo]]

    def g(self, x: Tree, y: Tree) -> Tensor:
        return self.lower(_untree(x, self.x_is_tensor), _untree(y, self.y_is_tensor), *self.args)


def implicit(
    lower: Callable[..., Tensor], solver: str = "cg", **solver_options: Any
) -> Callable[[Callable[..., Variable]], Callable[..., Variable]]:
    """Decorator: make ``fn(x, *args) -> y`` differentiable in x by the implicit function
    theorem on ∇_y lower(x, y, *args) = 0.

    Args:
        lower: ``lower(x, y, *args) -> scalar``, the objective ``fn`` minimises over y.
        solver: linear solver for backward: ``"cg"`` (symmetric positive definite
            ∇²_yy g), ``"neumann"`` or ``"fixed_point"`` (need ``solver_lr`` < 2/L).
        solver_iters: Hessian-vector products at most (default 100).
        solver_tol: CG's relative residual tolerance (default 1e-10; 0: exactly
            ``solver_iters`` products, no host sync).
        solver_lr: the Neumann / fixed-point step (default 0.1).
        ridge: solve with ∇²_yy g + ridge·I (default 0): damping for an ill-conditioned or
            singular Hessian, at the price of a biased gradient.

    x and y are trees (``dict[str, Tensor]``) or single tensors, any dtype and device.
    Gradients flow to x only: ``args`` are constants (data). First derivatives only: a backward
    with ``create_graph=True`` through the result raises rather than miss the solve's part.
    ``fn`` runs on detached x, so its own autograd use (an inner ``torch.optim`` loop) is
    unaffected and no graph is kept.

    Example::

        @bl.implicit(lambda x, w: ridge_loss(x, w))
        def fit(x):
            return torch.linalg.solve(A + torch.diag(x.exp()), b)
        fit(log_l2).pow(2).sum().backward()
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    reject_unknown_options("solver", solver, solver_options, list(SOLVER_OPTIONS[solver]))
    options = {**DEFAULTS, **solver_options}
    check_int("solver_iters", options["solver_iters"], 0 if solver == "neumann" else 1)
    for name in ("solver_tol", "ridge"):
        if not isinstance(options[name], (int, float)) or options[name] < 0:
            raise ValueError(f"{name} must be a number >= 0, got {options[name]!r}")
    if not isinstance(options["solver_lr"], (int, float)) or not options["solver_lr"] > 0:
        raise ValueError(f"solver_lr must be a positive number, got {options['solver_lr']!r}")
    linear_solve = functools.partial(_solve, solver, options)

    def decorate(fn: Callable[..., Variable]) -> Callable[..., Variable]:
        @functools.wraps(fn)
        def wrapped(x: Variable, *args: Any) -> Variable:
            x_tree, x_is_tensor = _as_tree(x, "x")
            y_out = fn(_untree(tr.detach(x_tree), x_is_tensor), *args)
            y_tree, y_is_tensor = _as_tree(y_out, f"the output of {fn.__name__}")
            spec = _Spec(lower, args, tuple(x_tree), tuple(y_tree), x_is_tensor, y_is_tensor,
                         linear_solve)  # fmt: skip
            y_leaves = _ImplicitFunction.apply(
                spec, *x_tree.values(), *tr.detach(y_tree).values()
            )
            return _untree(dict(zip(spec.y_keys, y_leaves, strict=True)), y_is_tensor)

        return wrapped

    return decorate


class _ImplicitFunction(torch.autograd.Function):
    """Forward: y as the solver found it. Backward: −∇²_xy g · (∇²_yy g + ridge·I)⁻¹ ∂L/∂y."""

    @staticmethod
    def forward(ctx: Any, spec: _Spec, *leaves: Tensor) -> tuple[Tensor, ...]:
        n = len(spec.x_keys)
        ctx.spec = spec
        ctx.save_for_backward(*leaves)
        return tuple(t.view_as(t) for t in leaves[n:])

    @staticmethod
    def backward(ctx: Any, *grad_y: Tensor | None) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: the result would miss the solve's part
            raise RuntimeError(
                "bl.implicit gives first derivatives only: differentiate without "
                "create_graph=True through it"
            )
        spec: _Spec = ctx.spec
        n = len(spec.x_keys)
        leaves = [t.detach() for t in ctx.saved_tensors]
        x = dict(zip(spec.x_keys, leaves[:n], strict=True))
        y = dict(zip(spec.y_keys, leaves[n:], strict=True))
        b = {
            k: torch.zeros_like(y[k]) if g is None else g.to(y[k].dtype)
            for k, g in zip(spec.y_keys, grad_y, strict=True)
        }
        wanted = [k for k, need in zip(spec.x_keys, ctx.needs_input_grad[1 : n + 1], strict=True)
                  if need]  # fmt: skip

        def grad_y_of(x_: Tree, y_: Tree) -> Tree:
            return grad(spec.g, argnums=1)(x_, y_)

        def hvp(v: Tree) -> Tree:
            return jvp(lambda y_: grad_y_of(x, y_), (y,), (v,))[1]

        v, _ = spec.solve(hvp, b)

        def grad_y_in(sub: Tree) -> Tree:
            return grad_y_of({**x, **sub}, y)

        _, pull = vjp(grad_y_in, {k: x[k] for k in wanted})
        (mixed,) = pull(v)
        out = {k: -mixed[k] for k in wanted}
        return (None, *(out.get(k) for k in spec.x_keys), *([None] * len(spec.y_keys)))


def _solve(
    solver: str, options: dict[str, Any], matvec: Callable[[Tree], Tree], b: Tree
) -> tuple[Tree, SolveInfo]:
    ridge = options["ridge"]
    if ridge:
        plain = matvec

        def matvec(v: Tree) -> Tree:
            return tr.axpy(ridge, v, plain(v))

    iters = options["solver_iters"]
    if solver == "cg":
        return conjugate_gradient(matvec, b, None, iters, options["solver_tol"])
    if solver == "neumann":  # J products: a series of J + 1 terms
        return neumann(matvec, b, options["solver_lr"], iters + 1)
    return fixed_point(matvec, b, None, options["solver_lr"], iters)


def _as_tree(value: object, name: str) -> tuple[Tree, bool]:
    if isinstance(value, Tensor):
        value = {"": value}
        return tr.check_tree(value, name), True
    return tr.check_tree(value, name), False


def _untree(tree: Tree, is_tensor: bool) -> Variable:
    return tree[""] if is_tensor else tree

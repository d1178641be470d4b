"""Counted, NaN-watched oracles: the only ways a method touches the losses.

Gradients, Hessian-vector and mixed products, JVPs and evaluations, each built on
``torch.func`` (safe under vmap, grad and jvp, so unrolled and vmapped methods compose them) and
counted in ``counts`` so every method's cost is reported as oracle counts beside seconds.
Several products at one point share one graph of ∇_y g (:meth:`Oracles.linearize_lower`).

Three things are injected rather than hard-wired:
- ``reduce``: applied to every oracle output (the mean over ranks when each rank holds a slice
  of every batch, set by :func:`bilevel.distributed.shard_data`);
- ``lower_autocast``: the dtype the lower loss runs under ``torch.autocast`` with;
- representations: a loss that depends on x only through z = φ(x, batch) (features of a
  backbone, a learned representation) declares φ; z is computed once per (x, batch) with its
  pullback, every y-derivative uses z, and every x-derivative is taken at z and pulled back
  through φ once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp

from bilevel.grad_mode import grad_enabled
from bilevel.linearization import LowerLinearization
from bilevel.tree import Tree

Loss = Callable[[Any, Tree, Any], Tensor]
Representation = Callable[[Tree, Any], Any]
Pullback = Callable[[Any], Tree]
_WIDE = frozenset({torch.float32, torch.float64})  # dtypes the NaN watch sums in as they are

ORACLES = (
    "lower_grad",  # ∇_y g
    "upper_grad",  # ∇_x f and ∇_y f together (one reverse pass)
    "linearize",  # ∇_y g with its graph kept for the products below (or one vjp of ∇_y g)
    "hvp",  # ∇²_yy g · v (one pullback through a linearisation)
    "mixed",  # ∇²_xy g · v  (result shaped like x)
    "jvp",  # forward-mode derivative of ∇_y g along (dx, dy)
    "lower_eval",
    "upper_eval",
    "lower_grad_x",  # ∇_x g (zeroth/first-order methods)
    "upper_hvp",  # ∇²_yy f · v (differentiating through ∇_y f, e.g. BDA's aggregated steps)
    "upper_mixed",  # ∇²_xy f · v
)


SOLVE = "linear solve"  # the flag of a rejected linear solve (not an oracle)
STEP_SIZE = "solver step size"  # the flag of a diverged Neumann / fixed-point iteration
# what a broken linear solve flags: its products and the estimate built from them
_SOLVE_SIDE = {SOLVE, STEP_SIZE, "hvp", "mixed", "linearize", "hypergradient (squared)"}


class _Switch:
    """A block with one boolean attribute of ``owner`` off, restored on exit (a plain class:
    cheaper per use than a generator-based ``contextlib.contextmanager``, and methods enter
    one every step)."""

    def __init__(self, owner: object, name: str) -> None:
        self.owner, self.name = owner, name

    def __enter__(self) -> None:
        self.previous = getattr(self.owner, self.name)
        setattr(self.owner, self.name, False)

    def __exit__(self, *exc: object) -> None:
        setattr(self.owner, self.name, self.previous)


class NonFiniteError(FloatingPointError):
    """An oracle produced NaN or Inf."""


@dataclass
class _Represented:
    """z = φ(x, batch) and its pullback, valid while x's tensors and the batch are the same
    objects, unmodified."""

    x: list[Tensor]
    versions: list[int]
    batch: Any
    z: Any
    pull: Pullback

    def matches(self, x: Tree, batch: Any) -> bool:
        tensors = list(x.values())
        return (
            batch is self.batch
            and len(tensors) == len(self.x)
            and all(a is b for a, b in zip(tensors, self.x, strict=True))
            and [t._version for t in tensors] == self.versions
        )


class Oracles:
    """The oracle side of a :class:`bilevel.Problem` (a base class of it)."""

    upper: Loss
    lower: Loss

    def _init_oracles(
        self,
        check_finite: bool,
        lower_autocast: torch.dtype | None,
        lower_representation: Representation | None,
        upper_representation: Representation | None,
    ) -> None:
        self.check_finite = check_finite
        self.lower_autocast = lower_autocast
        self.representations = {"lower": lower_representation, "upper": upper_representation}
        self.reduce: Callable[[Tree], Tree] | None = None
        self.counts: Counter[str] = Counter()
        self._counting = True
        self._watching = True
        # oracle or flag -> (running sum of its float flags, running "any" of its bool flags)
        self._nonfinite: dict[str, tuple[Tensor | None, Tensor | None]] = {}
        self._represented: dict[str, _Represented] = {}

    # ----------------------------------------------------------------- counting
    def _count(self, oracle: str, n: int = 1) -> None:
        if self._counting:
            self.counts[oracle] += n

    def count(self, oracle: str, n: int = 1) -> None:
        """Record ``n`` uses of ``oracle`` done implicitly (e.g. the backward pass of ITD)."""
        if oracle not in ORACLES:
            raise ValueError(f"unknown oracle {oracle!r}; known: {', '.join(ORACLES)}")
        self._count(oracle, n)

    def uncounted(self) -> _Switch:
        """Oracle calls inside this block (logging, evaluation) are not counted."""
        return _Switch(self, "_counting")

    def unwatched(self) -> _Switch:
        """Skip the NaN/Inf flags inside this block: for oracle calls made under ``vmap`` or
        nested transforms, whose outputs must not escape; the caller watches its result."""
        return _Switch(self, "_watching")

    @property
    def watching(self) -> bool:
        """Whether :meth:`watch` records anything here (``check_finite``, outside
        :meth:`uncounted` and :meth:`unwatched` blocks)."""
        return self.check_finite and self._counting and self._watching

    def watch(self, oracle: str, *outs: Tree | Tensor) -> None:
        """Flag NaN/Inf in ``outs`` (trees or tensors, attributed to ``oracle``) without a host
        sync.

        Cheap enough for every oracle call: the sum of each output tensor (non-finite when an
        entry is; summed in the tensor's own dtype, at least float32, which overflows only for
        entries near 1e34 — where the step's own norms have long overflowed) is added to the
        oracle's running total, and :meth:`raise_if_nonfinite` checks all totals at once, one
        host sync per outer step.
        """
        if not self.watching:
            return
        parts = [
            _finite_sum(t)
            for out in outs
            for t in (out.values() if isinstance(out, dict) else (out,))
        ]
        self._keep(oracle, parts)

    def watch_solve(self, *flags: Tensor, flag: str = SOLVE) -> None:
        """Flag a linear solve (no host sync) when one of ``flags`` is bad: a 0-dim bool tensor
        that is True, or a floating one (a norm of the solve's) that is non-finite.
        :meth:`raise_if_nonfinite` then names the linear solve (``flag`` STEP_SIZE: a diverged
        stationary iteration, named with its step)."""
        if self.watching:
            self._keep(flag, list(flags))

    def _keep(self, name: str, flags: list[Tensor]) -> None:
        """Fold 0-dim ``flags`` (bool: True is bad; floating: non-finite is bad) into ``name``'s
        running totals, which replace the old ones: two small tensors per name live between
        checks. (Keeping every flag until the check, allocated between a step's large
        temporaries, fragmented the heap: resident memory grew ~0.5 MB per outer step of the
        peer benchmark's AID-CG.)"""
        if not flags:
            return
        total, bad = self._nonfinite.get(name, (None, None))
        for flag in flags:
            if flag.dtype == torch.bool:
                bad = flag if bad is None else bad | _on(flag, bad)
            else:
                total = flag if total is None else total + _on(flag, total)
        self._nonfinite[name] = (total, bad)

    def raise_if_nonfinite(self, step: int) -> None:
        """Raise :class:`NonFiniteError` if any oracle produced NaN/Inf (one host sync)."""
        if not self._nonfinite:
            return
        kept = self._nonfinite
        self._nonfinite = {}
        names = list(kept)
        device = next(t for t in kept[names[0]] if t is not None).device
        finite = torch.stack([_good(*kept[n], device) for n in names]).tolist()
        bad = [name for name, ok in zip(names, finite, strict=True) if not ok]
        solve_side = set(bad) <= _SOLVE_SIDE  # the inner loop's own oracles are fine
        if STEP_SIZE in bad and solve_side:
            raise NonFiniteError(
                f"the Neumann / fixed-point linear solve diverged at outer step {step}: its "
                "residual ended more than 10× above ‖∇_y f‖, so solver_lr is above 2/λ_max of "
                "the damped lower Hessian at this inner iterate (λ_max can grow as the inner "
                "problem trains, past what the first step's check saw); lower solver_lr, or "
                "use cg"
            )
        if SOLVE in bad and solve_side:
            raise NonFiniteError(
                f"the linear solve (∇²_yy g + ρI) v = ∇_y f broke down at outer step {step} "
                f"({', '.join(bad)} flagged): v or the hypergradient is non-finite, or ‖v‖ "
                "far above ‖∇_y f‖/ρ — the lower Hessian is indefinite or singular at the "
                "inner iterate (e.g. a network away from a minimum); set ridge=ρ > 0 (or a "
                "larger one), or use 'itd'"
            )
        if bad:
            oracles = ", ".join(b for b in bad if b not in (SOLVE, STEP_SIZE))
            raise NonFiniteError(
                f"oracle(s) {oracles} produced NaN/Inf at outer step {step}; the inner loop "
                "may diverge (lower inner_lr) or the losses overflow"
            )

    def _record(self, oracle: str, out: Tree) -> None:
        if self._counting:
            self.counts[oracle] += 1
        self.watch(oracle, out)

    # ----------------------------------------------------------------- oracles
    def lower_value(self, x: Tree, y: Tree, batch: Any = None) -> Tensor:
        self._count("lower_eval")
        return self._reduced(self._lower_at(self._at("lower", x, batch)[0], y, batch))

    def upper_value(self, x: Tree, y: Tree, batch: Any = None) -> Tensor:
        self._count("upper_eval")
        return self._reduced(self._upper_at(self._at("upper", x, batch)[0], y, batch))

    def grad_lower_y(self, x: Tree, y: Tree, batch: Any = None, mode: str = "func") -> Tree:
        """∇_y g(x, y), by one of three means that give the same numbers:

        - ``"func"`` (default): ``torch.func.grad``, differentiable w.r.t. x and y under
          ``torch.func`` transforms (vmap, jvp, grad): for vmapped and forward-mode methods.
        - ``"autograd"``: ``torch.autograd`` on detached leaves, no graph: the fastest for a
          plain inner loop (measured ~10% faster on hyper-cleaning), not under transforms.
        - ``"graph"``: ``torch.autograd`` keeping the graph, so a regular ``backward`` through
          an unrolled loop reaches x (and y's start, if it requires grad): ITD's path.
        """
        self._count("lower_grad")
        w = self._at("lower", x, batch)[0]
        if mode == "autograd":  # the inner loops' mode first: checked every inner step
            leaves = {k: v.detach().requires_grad_(True) for k, v in y.items()}
            with grad_enabled():
                out = self._autograd_lower_y(w, leaves, batch, create_graph=False)
        elif mode == "func":
            out = self._grad_lower_y(w, y, batch)
        elif mode == "graph":
            out = self._autograd_lower_y(w, y, batch, create_graph=True)
        else:
            raise ValueError(f"mode must be 'func', 'autograd' or 'graph', got {mode!r}")
        if self.reduce is not None:
            out = self.reduce(out)
        self.watch("lower_grad", out)
        return out

    def grad_lower_x(self, x: Tree, y: Tree, batch: Any = None) -> Tree:
        """∇_x g(x, y)."""
        self._count("lower_grad_x")
        w, pull = self._at("lower", x, batch)
        out = self._reduced(_pulled(pull, grad(lambda w_: self._lower_at(w_, y, batch))(w)))
        self.watch("lower_grad_x", out)
        return out

    def grad_upper(
        self, x: Tree, y: Tree, batch: Any = None, mode: str = "func"
    ) -> tuple[Tree, Tree]:
        """(∇_x f, ∇_y f) at (x, y) from one reverse pass.

        ``mode="func"`` (default) is ``torch.func.grad``, safe under transforms;
        ``mode="autograd"`` is ``torch.autograd`` on detached leaves, no graph kept: the same
        numbers ~0.3 ms sooner per call (peer benchmark), for methods' plain steps only (a
        representation that is neither a tensor nor a dict of tensors uses torch.func).
        """
        self._count("upper_grad")
        w, pull = self._at("upper", x, batch)
        loss = lambda w_, y_: self._upper_at(w_, y_, batch)  # noqa: E731
        if mode == "func" or (mode == "autograd" and not isinstance(w, Tensor | dict)):
            gw, gy = grad(loss, (0, 1))(w, y)
        elif mode == "autograd":
            gw, gy = _autograd_grads(loss, w, y)
        else:
            raise ValueError(f"mode must be 'func' or 'autograd', got {mode!r}")
        gx, gy = self._reduced(_pulled(pull, gw)), self._reduced(gy)
        self.watch("upper_grad", gx, gy)
        return gx, gy

    def linearize_lower(self, x: Tree, y: Tree, batch: Any = None) -> LowerLinearization:
        """∇_y g linearised at (x, y, batch): ``.hvp(v)`` and ``.mixed(v)`` are then one pullback
        each through one graph of ∇_y g, instead of rebuilding ∇_y g per product.

        Counted: one ``linearize`` (a forward and a backward pass of g, like ``lower_grad``),
        then one ``hvp`` or ``mixed`` per product. Not for use under ``torch.func`` transforms
        (use :meth:`lower_grad_products` there).
        """
        self._count("linearize")
        w, pull = self._at("lower", x, batch)
        lin = LowerLinearization(
            lambda w_, y_: self._lower_at(w_, y_, batch),
            w,
            y,
            reduce=self._reduced,
            record=self._record,
            pull=pull,
        )
        if self.watching:  # lin.grad is built on first use
            self.watch("linearize", lin.grad)
        return lin

    def hvp_lower_yy(self, x: Tree, y: Tree, v: Tree, batch: Any = None) -> Tree:
        """∇²_yy g(x, y) · v by reverse-over-reverse differentiation (the Hessian is symmetric).

        Rebuilds ∇_y g for this one product, so it counts one ``linearize`` and one ``hvp``;
        several products at one point should share :meth:`linearize_lower`. Safe under
        ``torch.func`` transforms. Reverse-over-reverse measured 1.7–3× faster than
        forward-over-reverse on the hyper-cleaning and Krylov tasks (torch 2.13, CPU).
        """
        return self.lower_grad_products(x, y, v, batch)[1]

    def mixed_lower_xy(self, x: Tree, y: Tree, v: Tree, batch: Any = None) -> Tree:
        """∇²_xy g(x, y) · v = ∇_x ⟨∇_y g(x, y), v⟩, a tree shaped like x. Counts one
        ``linearize`` and one ``mixed`` (see :meth:`hvp_lower_yy`)."""
        self._count("linearize")
        w, pull = self._at("lower", x, batch)
        _, pullback = vjp(lambda w_: self._grad_lower_y(w_, y, batch), w)
        out = self._reduced(_pulled(pull, pullback(v)[0]))
        self._record("mixed", out)
        return out

    def lower_grad_products(
        self, x: Tree, y: Tree, v: Tree, batch: Any = None, mixed: bool = False
    ) -> tuple[Tree, Tree, Tree | None]:
        """(∇_y g, ∇²_yy g · v, ∇²_xy g · v or None) from one linearisation of ∇_y g, by
        ``torch.func.vjp`` (safe under vmap and grad, unlike :meth:`linearize_lower`).

        Counts one ``linearize`` (which yields ∇_y g), one ``hvp`` and, with ``mixed``, one
        ``mixed``: the pullback then runs towards x and y together.
        """
        self._count("linearize")
        w, pull = self._at("lower", x, batch)
        if mixed:
            grad_y, pullback = vjp(lambda w_, y_: self._grad_lower_y(w_, y_, batch), w, y)
            mixed_w, hvp_out = pullback(v)
            mixed_out = self._reduced(_pulled(pull, mixed_w))
            self._record("mixed", mixed_out)
        else:
            grad_y, pullback = vjp(lambda y_: self._grad_lower_y(w, y_, batch), y)
            (hvp_out,), mixed_out = pullback(v), None
        grad_y, hvp_out = self._reduced(grad_y), self._reduced(hvp_out)
        self.watch("linearize", grad_y)
        self._record("hvp", hvp_out)
        return grad_y, hvp_out, mixed_out

    def jvp_lower_grad(
        self, x: Tree, y: Tree, dx: Tree, dy: Tree, batch: Any = None
    ) -> tuple[Tree, Tree]:
        """(∇_y g, ∇²_yx g · dx + ∇²_yy g · dy): the tangent of the inner gradient."""
        self._count("jvp")
        phi = self.representations["lower"]

        def inner_grad(x_: Tree, y_: Tree) -> Tree:
            w = x_ if phi is None else phi(x_, batch)  # the tangent must flow through φ
            return self._grad_lower_y(w, y_, batch)

        out = jvp(inner_grad, (x, y), (dx, dy))
        out = self._reduced(out[0]), self._reduced(out[1])
        self.watch("jvp", out[1])
        return out

    # ----------------------------------------------------------------- building blocks
    def _reduced(self, out: Any) -> Any:
        """The injected cross-rank reduction of an oracle output (identity without one)."""
        if self.reduce is None:
            return out
        if isinstance(out, Tensor):
            return self.reduce({"value": out})["value"]
        return self.reduce(out)

    def _at(self, level: str, x: Tree, batch: Any) -> tuple[Any, Pullback | None]:
        """What the ``level`` loss takes in place of x, and the pullback to x (None: x itself).

        With a representation φ, z = φ(x, batch) is computed once per (x, batch) — the same
        tensor objects, unmodified — with ``torch.func.vjp``; it composes with outer autograd
        and torch.func transforms, so unrolled methods differentiate through φ once.
        """
        phi = self.representations[level]
        if phi is None:
            return x, None
        cached = self._represented.get(level)
        if cached is not None and cached.matches(x, batch):
            return cached.z, cached.pull
        z, pullback = vjp(lambda x_: phi(x_, batch), x)
        tensors = list(x.values())
        self._represented[level] = _Represented(
            x=tensors,
            versions=[t._version for t in tensors],
            batch=batch,
            z=z,
            pull=lambda gz: pullback(gz)[0],
        )
        return z, self._represented[level].pull

    def _new_point(self) -> None:
        self._represented.clear()

    def _grad_lower_y(self, w: Any, y: Tree, batch: Any) -> Tree:
        """∇_y g at the lower loss's own argument w (x or z), uncounted."""
        return grad(lambda y_: self._lower_at(w, y_, batch))(y)

    def _autograd_lower_y(self, w: Any, y: Tree, batch: Any, create_graph: bool) -> Tree:
        """∇_y g by torch.autograd (y's tensors must require grad or carry a graph); components
        g does not depend on are zeros."""
        grads = torch.autograd.grad(
            self._lower_at(w, y, batch),
            list(y.values()),
            create_graph=create_graph,
            allow_unused=True,
        )
        # zeros_like never requires grad
        return {
            k: torch.zeros_like(v) if g is None else g
            for (k, v), g in zip(y.items(), grads, strict=True)
        }

    def _lower_at(self, w: Any, y: Tree, batch: Any) -> Tensor:
        if self.lower_autocast is None:
            return scalar_loss(self.lower(w, y, batch), "lower")
        device = next(iter(y.values())).device.type
        with torch.autocast(device, dtype=self.lower_autocast):
            return scalar_loss(self.lower(w, y, batch), "lower")

    def _upper_at(self, w: Any, y: Tree, batch: Any) -> Tensor:
        return scalar_loss(self.upper(w, y, batch), "upper")


def _finite_sum(t: Tensor) -> Tensor:
    """A sum of ``t``'s entries, non-finite when one is (float32 at least, no graph)."""
    if t.requires_grad:
        t = t.detach()
    return t.sum() if t.dtype in _WIDE else t.sum(dtype=torch.float32)


def _on(flag: Tensor, total: Tensor) -> Tensor:
    """``flag`` on ``total``'s device (no dispatch when it is there)."""
    return flag if flag.device == total.device else flag.to(total.device)


def _good(total: Tensor | None, bad: Tensor | None, device: torch.device) -> Tensor:
    """A 0-dim bool on ``device``: the float total is finite and no bool flag was True."""
    if total is None:
        good = torch.ones((), dtype=torch.bool, device=device)
    else:
        good = torch.isfinite(total.to(device))
    return good if bad is None else good & ~bad.to(device)


def _autograd_grads(
    loss: Callable[[Any, Tree], Tensor], w: Tree | Tensor, y: Tree
) -> tuple[Tree | Tensor, Tree]:
    """(∇_w loss, ∇_y loss) by torch.autograd on detached leaves; zeros where unused."""
    w_tree = {"w": w} if isinstance(w, Tensor) else w
    w_leaves = {k: v.detach().requires_grad_(True) for k, v in w_tree.items()}
    y_leaves = {k: v.detach().requires_grad_(True) for k, v in y.items()}
    with grad_enabled():
        value = loss(w_leaves["w"] if isinstance(w, Tensor) else w_leaves, y_leaves)
        inputs = [*w_leaves.values(), *y_leaves.values()]
        grads = torch.autograd.grad(value, inputs, allow_unused=True)
    n = len(w_leaves)
    gw = {k: _or_zeros(g, v) for (k, v), g in zip(w_leaves.items(), grads[:n], strict=True)}
    gy = {k: _or_zeros(g, v) for (k, v), g in zip(y_leaves.items(), grads[n:], strict=True)}
    return (gw["w"] if isinstance(w, Tensor) else gw), gy


def _or_zeros(g: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g  # zeros_like never requires grad


def _pulled(pull: Pullback | None, gw: Any) -> Tree:
    return gw if pull is None else pull(gw)


def scalar_loss(loss: object, name: str) -> Tensor:
    """``loss`` checked to be a 0-dim tensor (the message says how to fix it)."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"the {name} loss must return a torch.Tensor, got {type(loss).__name__}")
    if loss.dim() != 0:
        raise ValueError(
            f"the {name} loss must return a scalar (0-dim) tensor, got shape {tuple(loss.shape)}; "
            "reduce it with .mean() or .sum()"
        )
    return loss

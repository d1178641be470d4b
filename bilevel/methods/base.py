"""The method protocol and the registry.

A method turns the current outer variable into a hypergradient estimate and carries its own
state between outer steps:

    state = method.init(problem, x, y)
    hg, state = method.step(problem, x, state)     # hg: tree like x; state.y: inner iterate

Options are dataclass fields with names shared across methods (``inner_steps``, ``inner_lr``,
``inner_optimizer``, ``warm_start``, ``solver_iters``, ...), so methods swap by name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from bilevel import tree as tr
from bilevel.checks import check_int, reject_unknown_options
from bilevel.inner import InnerOptimizer, make_inner_optimizer
from bilevel.problem import Problem
from bilevel.tree import Tree


@dataclass
class MethodState:
    """What a method carries between outer steps. ``y`` is the current inner iterate, ``y0`` the
    user's start (used when ``warm_start=False``), ``info`` per-step diagnostics (tensors)."""

    y: Tree
    y0: Tree
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class Method:
    """Base class: options shared by every method that runs an inner loop."""

    name: ClassVar[str] = ""
    inner_steps: int = 10
    inner_lr: float = 0.1
    inner_optimizer: str | InnerOptimizer = "gd"
    warm_start: bool = True

    def __post_init__(self) -> None:
        check_int("inner_steps", self.inner_steps, 0)
        self.optimizer = make_inner_optimizer(self.inner_optimizer, self.inner_lr)

    def init(self, problem: Problem, x: Tree, y: Tree | None) -> MethodState:
        """Initial state. ``y`` is cloned: the caller's tensors are never modified."""
        y0 = tr.clone(problem.initial_y(tr.detach(x), y))
        return MethodState(y=y0, y0=y0)

    def step(self, problem: Problem, x: Tree, state: MethodState) -> tuple[Tree, MethodState]:
        raise NotImplementedError

    def inner_start(self, problem: Problem, x: Tree, state: MethodState) -> Tree:
        """Where this outer step's inner loop starts: init_lower(x) for meta-initialisation,
        else the last iterate (``warm_start``) or the user's y0."""
        if problem.init_lower is not None:
            return tr.detach(problem.init_lower(tr.detach(x)))
        return state.y if self.warm_start else state.y0

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.init]

    @classmethod
    def description(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0]


# state.info entries every history row carries under their own name (implicit, Krylov and
# single-loop methods: the solve's ‖A v − b‖ and the estimate's norm)
ROW_INFO = ("residual", "hypergradient_norm")


def info_row(state: MethodState) -> dict[str, float]:
    """The :data:`ROW_INFO` entries of ``state.info`` as numbers (one host read each)."""
    return {k: float(state.info[k]) for k in ROW_INFO if k in state.info}


_REGISTRY: dict[str, type[Method]] = {}


def register(name: str):
    """Class decorator: make the method available as ``bilevel.method(name)``."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def methods_available() -> list[str]:
    """Names accepted by :func:`method`."""
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(methods_available())}")
    return _REGISTRY[name]


def method(name: str, **options: Any) -> Method:
    """Build a registered method by name; unknown options raise a ``TypeError`` listing the
    options the method has."""
    cls = method_class(name)
    reject_unknown_options("method", name, options, cls.option_names())
    return cls(**options)

"""The method protocol and the registry.

A method turns the current outer variable into a hypergradient estimate and carries its own
state between outer steps:

    state = method.init(problem, x, y)
    hg, state = method.step(problem, x, state)     # hg: tree like x; state.y: inner iterate

Options are dataclass fields with names shared across methods (``inner_steps``, ``inner_lr``,
``inner_optimizer``, ``warm_start``, ``solver_iters``, ...), so methods swap by name, and each
name means one thing everywhere. An option that was renamed is listed in the class's
``RENAMED`` (old -> new name); passing the old name raises an error naming the new one, whether
the method is built by :func:`method` or by calling the class.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from bilevel import tree as tr
from bilevel.checks import check_fields, check_int, reject_renamed_options, reject_unknown_options
from bilevel.inner import InnerOptimizer, make_inner_optimizer, run_inner_with_state
from bilevel.problem import Problem
from bilevel.tree import Tree


@dataclass
class MethodState:
    """What a method carries between outer steps. ``y`` is the current inner iterate, ``y0`` the
    user's start (used when ``warm_start=False``), ``info`` per-step diagnostics (tensors)."""

    y: Tree
    y0: Tree
    info: dict[str, Any] = field(default_factory=dict)
    inner_optimizer_state: Any = None  # kept across outer steps with inner_state="keep"


class _OptionsChecked(type):
    """Metaclass: reject renamed options before the dataclass ``__init__`` sees them, so
    ``ESJ(mu=...)`` names the new option as clearly as ``bl.method("esj", mu=...)``."""

    def __call__(cls, *args: Any, **options: Any) -> Any:
        reject_renamed_options(cls.name or cls.__name__, options, cls.RENAMED)
        return super().__call__(*args, **options)


INNER_STATES = ("reset", "keep")


@dataclass(kw_only=True)
class Method(metaclass=_OptionsChecked):
    """Base class: options shared by every method that runs an inner loop.

    ``inner_state``: ``"reset"`` (default) starts the inner optimizer's state (momentum, Adam's
    moments) afresh at every outer step; ``"keep"`` carries it over with the warm-started y
    (methods with ``KEEPS_INNER_STATE`` only: those whose inner loop is not differentiated).
    """

    name: ClassVar[str] = ""
    RENAMED: ClassVar[dict[str, str]] = {}
    KEEPS_INNER_STATE: ClassVar[bool] = False
    inner_steps: int = 10
    inner_lr: float = 0.1
    inner_optimizer: str | InnerOptimizer = "gd"
    warm_start: bool = True
    inner_state: str = "reset"

    def __post_init__(self) -> None:
        check_fields(self)  # every option's type, from its annotation
        check_int("inner_steps", self.inner_steps, 0)
        self.optimizer = make_inner_optimizer(self.inner_optimizer, self.inner_lr)
        if self.inner_state not in INNER_STATES:
            raise ValueError(
                f"inner_state must be one of {', '.join(INNER_STATES)}, got {self.inner_state!r}"
            )
        if self.inner_state == "keep":
            if not self.KEEPS_INNER_STATE:
                raise ValueError(
                    f"{self.name or type(self).__name__} differentiates through or restarts its "
                    "inner loop: inner_state='keep' is not supported (use 'reset')"
                )
            if self.warm_start is not True:
                raise ValueError("inner_state='keep' needs warm_start=True (it keeps the state "
                                 "of the inner optimizer with the y it belongs to)")  # fmt: skip

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

    def inner_loop(self, problem: Problem, x: Tree, state: MethodState) -> Tree:
        """This outer step's ``inner_steps`` optimizer steps from :meth:`inner_start`; with
        ``inner_state="keep"`` the optimizer's state is taken from and saved to ``state``."""
        if self.inner_state == "keep" and problem.init_lower is not None:
            raise ValueError("inner_state='keep' keeps the optimizer state of a warm-started y, "
                             "but init_lower restarts y every outer step: use 'reset'")  # fmt: skip
        y = self.inner_start(problem, x, state)
        kept = state.inner_optimizer_state if self.inner_state == "keep" else None
        y, opt_state = run_inner_with_state(problem, x, y, self.inner_steps, self.optimizer, kept)
        if self.inner_state == "keep":
            state.inner_optimizer_state = opt_state
        return y

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
    reject_renamed_options(name, options, cls.RENAMED)
    reject_unknown_options("method", name, options, cls.option_names())
    return cls(**options)

"""What a task is: a problem plus its starting point, evaluation callbacks and metadata."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from bilevel.checks import reject_renamed_options, reject_unknown_options
from bilevel.methods.base import Method, method_class, methods_available
from bilevel.problem import Problem
from bilevel.solve import Callback
from bilevel.tree import Tree


@dataclass
class Task:
    """A ready-to-run benchmark problem.

    ``callbacks`` compute task metrics at logged steps (``cb(ctx) -> dict``, see
    :class:`~bilevel.solve.StepContext`); ``metadata`` records the protocol (sizes, seeds,
    reference values) for result files; ``method_defaults`` are the options that suit the task:
    at top level only the options every method shares (:data:`SHARED_OPTIONS`: ``inner_steps``,
    ``inner_lr``, ``inner_optimizer``, ``warm_start``, ``inner_state``), applied to each method
    that takes them; any other option under the name of a method that takes it
    (``{"bda": {"mu": 0.5}}``; :func:`solver_defaults` writes the linear-solve blocks), so
    no default reaches a method that does not take it or reads it differently;
    ``solve_defaults`` the outer loop's (``steps``, ``outer_optimizer``, ``outer_lr``);
    ``references`` computes reference points shown beside the methods in benchmark tables
    (``{"oracle": {"test_accuracy": 84.1}, ...}``), called once per benchmark.
    """

    name: str
    problem: Problem
    x0: Tree
    y0: Tree | None
    callbacks: list[Callback] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    method_defaults: dict[str, Any] = field(default_factory=dict)
    solve_defaults: dict[str, Any] = field(default_factory=dict)
    references: Callable[[], dict[str, dict[str, float]]] | None = None

    def __post_init__(self) -> None:
        check_method_defaults(self.name, self.method_defaults)

    def method_options(self, method_name: str, **overrides: Any) -> dict[str, Any]:
        """This task's recommended options for ``method_name``: the shared ones it takes, then
        its own block, then ``overrides``."""
        known = set(method_class(method_name).option_names())
        shared = {k: v for k, v in self.method_defaults.items() if k in SHARED_OPTIONS}
        chosen = {k: v for k, v in shared.items() if k in known}
        specific = self.method_defaults.get(method_name, {})
        return {**chosen, **specific, **overrides}


# options of the Method base class: the only ones a task may give to every method at once
SHARED_OPTIONS = tuple(Method.option_names())


# the methods that take each linear-solve option (LancBiO's step is fallback_lr, AmIGO's
# solver_lr only applies to solver="gd")
SOLVER_ITERS_METHODS = ("cg", "neumann", "fixed_point", "stocbio", "amigo")
SOLVER_LR_METHODS = ("neumann", "fixed_point", "stocbio", "subbio", "soba")
# every method that solves (∇²_yy g + ρI) v = ∇_y f
RIDGE_METHODS = ("cg", "neumann", "fixed_point", "stocbio", "amigo", "subbio", "lancbio", "soba")


def solver_defaults(
    solver_iters: int | None = None, solver_lr: float | None = None, ridge: float | None = None
) -> dict[str, dict[str, Any]]:
    """Per-method blocks for ``method_defaults``: J = ``solver_iters`` (HVPs) for the methods
    in :data:`SOLVER_ITERS_METHODS`, the solve's step ``solver_lr`` for those in
    :data:`SOLVER_LR_METHODS`, the damping ``ridge`` for those in :data:`RIDGE_METHODS`."""
    blocks: dict[str, dict[str, Any]] = {}
    for option, value, names in (("solver_iters", solver_iters, SOLVER_ITERS_METHODS),
                                 ("solver_lr", solver_lr, SOLVER_LR_METHODS),
                                 ("ridge", ridge, RIDGE_METHODS)):  # fmt: skip
        if value is not None:
            for name in names:
                blocks.setdefault(name, {})[option] = value
    return blocks


def proximal_term(x: Tree, y: Tree, strength: float) -> Tensor:
    """iMAML's λ/2 Σ_t ‖y_t − x‖² (Rajeswaran, Finn, Kakade, Levine, NeurIPS 2019) over
    per-task copies y of x (a leading task dimension on every leaf of y)."""
    return 0.5 * strength * sum(torch.sum((y[k] - x[k]) ** 2) for k in y)


def check_method_defaults(task: str, defaults: dict[str, Any]) -> None:
    """Raise ``ValueError`` for a default that some method would take silently or wrongly:
    a non-shared option at top level, or a method block with an option that method lacks."""
    registered = set(methods_available())
    for key, value in defaults.items():
        if key in registered:
            if not isinstance(value, dict):
                raise ValueError(f"task {task!r}: method_defaults[{key!r}] must be a dict")
            cls = method_class(key)
            reject_renamed_options(key, value, cls.RENAMED)
            reject_unknown_options("method", key, value, cls.option_names())
        elif key not in SHARED_OPTIONS:
            raise ValueError(
                f"task {task!r}: method default {key!r} is not an option every method shares "
                f"({', '.join(SHARED_OPTIONS)}); give it per method, e.g. "
                f"method_defaults={{'cg': {{{key!r}: ...}}}}"
            )


TaskFactory = Callable[..., Task]
_TASKS: dict[str, TaskFactory] = {}


def register_task(name: str) -> Callable[[TaskFactory], TaskFactory]:
    """Decorator: make a task factory available as ``bilevel.tasks.make(name, **options)``."""

    def wrap(factory: TaskFactory) -> TaskFactory:
        if name in _TASKS:
            raise ValueError(f"task {name!r} is already registered")
        _TASKS[name] = factory
        return factory

    return wrap


def tasks_available() -> list[str]:
    return sorted(_TASKS)


def task_factory(name: str) -> TaskFactory:
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(tasks_available())}")
    return _TASKS[name]


def make(name: str, **options: Any) -> Task:
    """Build a registered task; unknown options raise a ``TypeError`` listing the valid ones."""
    factory = task_factory(name)
    reject_unknown_options("task", name, options, list(inspect.signature(factory).parameters))
    return factory(**options)

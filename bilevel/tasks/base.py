"""What a task is: a problem plus its starting point, evaluation callbacks and metadata."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bilevel.checks import reject_unknown_options
from bilevel.methods.base import method_class
from bilevel.problem import Problem
from bilevel.solve import Callback
from bilevel.tree import Tree


@dataclass
class Task:
    """A ready-to-run benchmark problem.

    ``callbacks`` compute task metrics at logged steps (``cb(ctx) -> dict``, see
    :class:`~bilevel.solve.StepContext`); ``metadata`` records the protocol (sizes, seeds,
    reference values) for result files; ``method_defaults`` are the options (``inner_steps``,
    ``inner_lr``, ...) that suit the task, applied to every method that has them — a key that is
    a method's name holds options for that method only (``{"bda": {"mu": 0.5}}``), for option
    names that mean different things in different methods;
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

    def method_options(self, method_name: str, **overrides: Any) -> dict[str, Any]:
        """This task's recommended options that ``method_name`` accepts, then ``overrides``."""
        known = set(method_class(method_name).option_names())
        chosen = {k: v for k, v in self.method_defaults.items() if k in known}
        specific = self.method_defaults.get(method_name, {})
        return {**chosen, **specific, **overrides}


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

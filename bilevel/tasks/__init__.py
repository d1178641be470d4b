"""Benchmark problems: each function returns a :class:`~bilevel.tasks.base.Task`."""

# importing a task module registers its task
from bilevel.tasks import few_shot as _few_shot  # noqa: F401
from bilevel.tasks import hyper_cleaning as _hyper_cleaning  # noqa: F401
from bilevel.tasks import sinusoid as _sinusoid  # noqa: F401
from bilevel.tasks.base import Task, make, register_task, task_factory, tasks_available
from bilevel.tasks.quadratic import QuadraticData, quadratic, quadratic_data

__all__ = [
    "QuadraticData",
    "Task",
    "make",
    "quadratic",
    "quadratic_data",
    "register_task",
    "task_factory",
    "tasks_available",
]

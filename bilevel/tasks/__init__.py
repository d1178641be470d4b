"""Benchmark problems: each function returns a :class:`~bilevel.tasks.base.Task`."""

from bilevel.tasks import hyper_cleaning as _hyper_cleaning  # noqa: F401 - registers the task
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

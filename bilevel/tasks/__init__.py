"""Benchmark problems: each function returns a :class:`~bilevel.tasks.base.Task`."""

from bilevel.tasks.base import Task
from bilevel.tasks.quadratic import QuadraticData, quadratic, quadratic_data

__all__ = ["QuadraticData", "Task", "quadratic", "quadratic_data"]

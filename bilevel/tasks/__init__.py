"""Benchmark problems: each function returns a :class:`~bilevel.tasks.base.Task`."""

# importing a task module registers its task
from bilevel.tasks import few_shot as _few_shot  # noqa: F401
from bilevel.tasks import hyper_cleaning as _hyper_cleaning  # noqa: F401
from bilevel.tasks import hyper_representation as _hyper_representation  # noqa: F401
from bilevel.tasks import krylov_synthetic as _krylov_synthetic  # noqa: F401
from bilevel.tasks import l2_regularization as _l2_regularization  # noqa: F401
from bilevel.tasks import lls_toy as _lls_toy  # noqa: F401
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

"""What a task is: a problem plus its starting point, evaluation callbacks and metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bilevel.problem import Problem
from bilevel.solve import Callback
from bilevel.tree import Tree


@dataclass
class Task:
    """A ready-to-run benchmark problem.

    ``callbacks`` compute task metrics at logged steps (``cb(step, x, state, hg) -> dict``);
    ``metadata`` records the protocol (sizes, seeds, reference values) for result files.
    """

    name: str
    problem: Problem
    x0: Tree
    y0: Tree | None
    callbacks: list[Callback] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

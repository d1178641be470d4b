"""bilevel: gradient-based bilevel optimization in PyTorch.

min_x F(x) = f(x, y*(x)),   y*(x) in argmin_y g(x, y)

import bilevel as bl
problem = bl.Problem(upper=f, lower=g)
hg = bl.hypergrad(problem, x, y, bl.method("cg", inner_steps=100))
result = bl.solve(problem, x, y, "itd", steps=100, outer_lr=0.01)

``import bilevel`` loads torch and the library core only. The benchmark harness
(``bl.tasks``, ``bilevel.data``, ``bilevel.bench``, ``bilevel.plots``, ``bilevel.cli``) and its
dependencies (the ``bench`` extra: scikit-learn, matplotlib, Pillow, fontTools, PyYAML, tqdm)
load on first use.
"""

import importlib
from typing import Any

from bilevel import methods
from bilevel.check import CheckReport, check
from bilevel.implicit import implicit
from bilevel.methods import Method, MethodState, method, methods_available, register
from bilevel.modules import buffers, functional, hyperparameters, params
from bilevel.problem import NonFiniteError, Problem
from bilevel.projections import box
from bilevel.solve import Result, StepContext, hypergrad, outer_step, solve
from bilevel.tree import Tree

__version__ = "0.1.0"

# the harness: imported on first attribute access, so the core stays light
_LAZY_SUBMODULES = ("tasks", "data", "bench", "plots", "cli")


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"bilevel.{name}")
    raise AttributeError(f"module 'bilevel' has no attribute {name!r}")


__all__ = [
    "CheckReport",
    "Method",
    "MethodState",
    "NonFiniteError",
    "Problem",
    "Result",
    "StepContext",
    "Tree",
    "box",
    "buffers",
    "check",
    "functional",
    "hyperparameters",
    "hypergrad",
    "implicit",
    "method",
    "methods",
    "methods_available",
    "outer_step",
    "params",
    "register",
    "solve",
]

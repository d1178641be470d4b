"""bilevel: gradient-based bilevel optimization in PyTorch.

min_x F(x) = f(x, y*(x)),   y*(x) in argmin_y g(x, y)

import bilevel as bl
problem = bl.Problem(upper=f, lower=g)
hg = bl.hypergrad(problem, x, y, bl.method("cg", inner_steps=100))
result = bl.solve(problem, x, y, "itd", steps=100, outer_lr=0.01)
"""

from bilevel import methods, tasks
from bilevel.methods import Method, MethodState, method, methods_available, register
from bilevel.modules import buffers, functional, params
from bilevel.problem import NonFiniteError, Problem
from bilevel.projections import box
from bilevel.solve import Result, StepContext, hypergrad, solve
from bilevel.tree import Tree

__version__ = "0.1.0"

__all__ = [
    "Method",
    "MethodState",
    "NonFiniteError",
    "Problem",
    "Result",
    "StepContext",
    "Tree",
    "box",
    "buffers",
    "functional",
    "hypergrad",
    "method",
    "methods",
    "methods_available",
    "params",
    "register",
    "solve",
    "tasks",
]

"""Hypergradient methods: one file per family, each class an ``init`` + ``step``."""

# importing a family's module registers its methods
from bilevel.methods import bda as _bda  # noqa: F401
from bilevel.methods import direct as _direct  # noqa: F401
from bilevel.methods import es as _es  # noqa: F401
from bilevel.methods import krylov as _krylov  # noqa: F401
from bilevel.methods import langevin as _langevin  # noqa: F401
from bilevel.methods import single_loop as _single_loop  # noqa: F401
from bilevel.methods.base import (
    Method,
    MethodState,
    method,
    method_class,
    methods_available,
    register,
)
from bilevel.methods.implicit import ConjugateGradient, FixedPoint, NeumannSeries
from bilevel.methods.unrolled import ITD, ForwardMode

__all__ = [
    "ITD",
    "ConjugateGradient",
    "FixedPoint",
    "ForwardMode",
    "Method",
    "MethodState",
    "NeumannSeries",
    "method",
    "method_class",
    "methods_available",
    "register",
]

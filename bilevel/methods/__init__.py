"""Hypergradient methods: one file per family, each class an ``init`` + ``step``."""

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

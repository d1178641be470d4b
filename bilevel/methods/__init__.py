"""Hypergradient methods: one file per family, each class an ``init`` + ``step``.

Every registered method's class is exported here (``bl.methods.LancBiO(m=5)`` is
``bl.method("lancbio", m=5)``).
"""

from bilevel.methods.base import (
    Method,
    MethodState,
    method,
    method_class,
    methods_available,
    register,
)
from bilevel.methods.bda import BDA
from bilevel.methods.es import ESJ, ESJS, HOZOG
from bilevel.methods.implicit import ConjugateGradient, FixedPoint, NeumannSeries
from bilevel.methods.krylov import LancBiO, SubBiO
from bilevel.methods.langevin import SGLD
from bilevel.methods.single_loop import SOBA, AmIGO, StocBiO
from bilevel.methods.unrolled import ITD, ForwardMode

__all__ = [
    "BDA",
    "ESJ",
    "ESJS",
    "HOZOG",
    "ITD",
    "SGLD",
    "SOBA",
    "AmIGO",
    "ConjugateGradient",
    "FixedPoint",
    "ForwardMode",
    "LancBiO",
    "Method",
    "MethodState",
    "NeumannSeries",
    "StocBiO",
    "SubBiO",
    "method",
    "method_class",
    "methods_available",
    "register",
]

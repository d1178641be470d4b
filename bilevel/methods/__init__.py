"""Hypergradient methods: one file per family, each class an ``init`` + ``step``.

Every registered method's class is exported here (``bl.methods.LancBiO(m=5)`` is
``bl.method("lancbio", m=5)``).
"""

# importing a family's module registers its methods
from bilevel.methods import bda as _bda  # noqa: F401
from bilevel.methods import direct as _direct  # noqa: F401
from bilevel.methods import es as _es  # noqa: F401
from bilevel.methods import first_order as _first_order  # noqa: F401
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
from bilevel.methods.bda import BDA
from bilevel.methods.direct import DirectTerm
from bilevel.methods.es import ESJ, ESJS, HOZOG
from bilevel.methods.first_order import BOME, F2SA
from bilevel.methods.implicit import ConjugateGradient, FixedPoint, NeumannSeries
from bilevel.methods.krylov import LancBiO, SubBiO
from bilevel.methods.langevin import SGLD
from bilevel.methods.single_loop import SOBA, AmIGO, StocBiO
from bilevel.methods.unrolled import ITD, ForwardMode

__all__ = [
    "BDA",
    "BOME",
    "DirectTerm",
    "ESJ",
    "ESJS",
    "F2SA",
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

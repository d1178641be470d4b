"""Projections of the outer variable, for ``solve(..., project=...)``.

BDA's convergence theory takes the upper variable in a compact set; a box is the simple case.
Any method can use it: ``solve`` applies the projection in place after every outer step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from bilevel.tree import Tree


def box(lower: float, upper: float) -> Callable[[Tree], None]:
    """A projection that clamps every entry of every leaf of x into [lower, upper], in place.

    Either bound may be infinite (one-sided box). Raises ``ValueError`` for bounds that are not
    numbers, are NaN, or have lower > upper.
    """
    for name, value in (("lower", lower), ("upper", upper)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"box {name} bound must be a number, got {value!r}")
    if lower > upper:
        raise ValueError(f"box needs lower <= upper, got [{lower}, {upper}]")

    def project(x: Tree) -> None:
        with torch.no_grad():
            for value in x.values():
                value.clamp_(lower, upper)

    return project


def parse_box(spec: str | Sequence[float]) -> list[float]:
    """``"LO,HI"`` or a pair of numbers -> ``[lo, hi]`` (checked like :func:`box`), as the CLI
    flag ``--box`` and the run config's ``box`` setting give it."""
    if isinstance(spec, str):
        parts = spec.split(",")
        try:
            spec = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"box must be LO,HI (two numbers), got {spec!r}") from None
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence) or len(spec) != 2:
        raise ValueError(f"box must be two numbers LO,HI, got {spec!r}")
    box(*spec)  # validates the bounds
    return [float(spec[0]), float(spec[1])]

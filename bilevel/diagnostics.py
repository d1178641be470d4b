"""Diagnostic callbacks for :func:`bilevel.solve`: what a method's state says about its estimate.

Callbacks run at logged steps outside the timed region, so the extra oracle calls and host
syncs here never count as a method's seconds. Any method whose state carries the linear-system
solution ``v`` (the AID methods, the single-loop methods, SubBiO, LancBiO) gets the residual.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch

from bilevel import tree as tr
from bilevel.problem import Problem
from bilevel.solve import Callback, StepContext


def linear_system_residual(problem: Problem, counted: bool = True) -> Callback:
    """A callback logging ``residual`` = ‖A v − b‖ and ``relative_residual`` = that / ‖b‖.

    A = ∇²_yy g and b = ∇_y f at (x̂, y) with x̂ the point the step's estimate was computed at
    (``ctx.hg_x``), y = ``state.y`` and v = ``state.v``: how well the method's current v solves
    the system its hypergradient relies on. Costs one HVP and one upper gradient per logged
    step; with ``counted`` they go into ``problem.counts`` like any oracle call, and the row's
    ``diagnostic_oracles`` says how many of the row's ``oracles`` were the callback's (a dict,
    so tables and plots skip it), so the method's own calls are the difference. With
    mini-batches both use the first batch of each stream (fixed, so rows compare; drawing from
    the streams would change the run). Methods without ``v`` log nothing.
    """
    spent = {"calls": 0, "last_step": 0}

    def callback(ctx: StepContext) -> dict[str, Any]:
        v = getattr(ctx.state, "v", None)
        if v is None:
            return {}
        if ctx.step <= spent["last_step"]:  # a new run with the same problem
            spent["calls"] = 0
        spent["last_step"] = ctx.step
        x, y = tr.detach(ctx.hg_x), ctx.state.y
        scope = contextlib.nullcontext() if counted else problem.uncounted()
        with scope, problem.unwatched(), torch.no_grad():
            _, b = problem.grad_upper(x, y, _first(problem.upper_data, problem))
            av = problem.hvp_lower_yy(x, y, v, _first(problem.lower_data, problem))
        residual, b_norm = tr.norm(tr.sub(av, b)), tr.norm(b)
        row: dict[str, Any] = {
            "residual": float(residual),
            "relative_residual": float(residual / torch.clamp(b_norm, min=1e-300)),
        }
        if counted:
            row["diagnostic_oracles"] = {"hvp": spent["calls"], "upper_grad": spent["calls"]}
        spent["calls"] += 1
        return row

    return callback


def step_info(ctx: StepContext) -> dict[str, float]:
    """A callback copying the numeric entries of ``state.info`` (iterations, guard counters such
    as LancBiO's ``restarts``/``breakdowns``/``indefinite``, SubBiO's ``fallbacks``) into the
    history row as ``info_<key>``. One host sync per tensor, outside the timed region."""
    row = {}
    for key, value in ctx.state.info.items():
        scalar_tensor = isinstance(value, torch.Tensor) and value.numel() == 1
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if scalar_tensor or number:
            row[f"info_{key}"] = float(value)
    return row


def diagnostic_callbacks(problem: Problem) -> list[Callback]:
    """The residual (counted) and the step info: what a task's ``diagnostics=True`` adds."""
    return [linear_system_residual(problem), step_info]


def _first(data: Iterable | None, problem: Problem) -> Any:
    """The first batch of a stream (iter() restarts seeded streams), else the step's task
    batch (``None`` for deterministic problems)."""
    return problem.current_task if data is None else next(iter(data))

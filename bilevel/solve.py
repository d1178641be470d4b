"""The outer loop: estimate at fixed x (:func:`hypergrad`) and optimise x (:func:`solve`).

The outer update is not a method's business: the hypergradient is written into ``.grad`` of the
outer tensors and a ``torch.optim`` optimizer steps them. ``solve`` logs one history row per
logged step (seconds excluding logging and callbacks, cumulative oracle counts, upper loss and
whatever the callbacks return) and can checkpoint and resume.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from bilevel import distributed
from bilevel import tree as tr
from bilevel.checks import check_int, check_positive
from bilevel.methods.base import Method, MethodState, info_row
from bilevel.methods.base import method as make_method
from bilevel.problem import Problem, validate
from bilevel.tree import Tree


@dataclass
class StepContext:
    """What a callback sees at a logged step: the updated outer variable ``x``, the method
    state (``state.y`` the inner iterate), and the estimate ``hg`` with the point ``hg_x`` it
    was computed at (x before the update)."""

    step: int
    x: Tree
    state: MethodState
    hg: Tree
    hg_x: Tree


Callback = Callable[[StepContext], "dict[str, Any] | None"]

OUTER_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
}


@dataclass
class Result:
    """What :func:`solve` returns: final outer and inner variables, the history rows and the
    method's final state."""

    x: Tree
    y: Tree
    history: list[dict[str, Any]] = field(default_factory=list)
    state: MethodState | None = None


def _as_method(method: Method | str) -> Method:
    if isinstance(method, str):
        return make_method(method)
    if not isinstance(method, Method):
        raise TypeError(f"method must be a bilevel Method or a name, got {type(method).__name__}")
    return method


def hypergrad(
    problem: Problem, x: Tree, y: Tree | None, method: Method | str, steps: int = 1
) -> Tree:
    """Run ``steps`` method steps at FIXED x and return the last hypergradient estimate.

    For stateful methods (warm-started AID, Krylov, single-loop) more steps give a better
    estimate. ``x`` and ``y`` are not modified.
    """
    method = _as_method(method)
    check_int("steps", steps, 1)
    x, y = validate(problem, x, y)
    x = tr.clone(x)
    state = method.init(problem, x, y)
    for step in range(steps):
        problem.next_task()
        hg, state = method.step(problem, x, state)
        problem.raise_if_nonfinite(step)
    return tr.detach(distributed.combine_task_shards(problem, hg))


def make_outer_optimizer(
    spec: str | type[torch.optim.Optimizer], params: Iterable[torch.Tensor], lr: float
) -> torch.optim.Optimizer:
    """Resolve ``outer_optimizer``: "adam", "sgd" or a ``torch.optim.Optimizer`` subclass."""
    if isinstance(spec, str):
        if spec not in OUTER_OPTIMIZERS:
            raise ValueError(
                f"unknown outer_optimizer {spec!r}; choose {', '.join(OUTER_OPTIMIZERS)} "
                "or pass a torch.optim.Optimizer class"
            )
        spec = OUTER_OPTIMIZERS[spec]
    if not (isinstance(spec, type) and issubclass(spec, torch.optim.Optimizer)):
        raise TypeError("outer_optimizer must be a name or a torch.optim.Optimizer subclass")
    check_positive("outer_lr", lr)
    return spec(list(params), lr=lr)


def solve(
    problem: Problem,
    x: Tree,
    y: Tree | None,
    method: Method | str,
    steps: int,
    outer_optimizer: str | type[torch.optim.Optimizer] = "adam",
    outer_lr: float = 1e-3,
    callbacks: Iterable[Callback] = (),
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 50,
    seed: int = 0,
    log_every: int = 1,
    project: Callable[[Tree], None] | None = None,
    progress: bool = False,
    time_budget: float | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> Result:
    """Optimise x for ``steps`` outer steps with ``method``'s hypergradients.

    Args:
        callbacks: ``cb(ctx: StepContext) -> dict | None``, called at each logged step outside
            the timed region; returned keys are added to the history row.
        checkpoint: file to save to every ``checkpoint_every`` steps and at the end; if it
            exists, the run resumes from it (same problem, method and arguments expected).
        project: in-place projection of x after each outer update (e.g. onto a box).
        log_every: log a history row every this many steps (and at the last step).
        time_budget: stop after the first step at which the timed seconds (method and outer
            update, not logging) reach this budget; that step is logged.
        on_log: called with each history row as soon as it is complete (e.g. to stream rows
            to a file, so an interrupted run keeps them).
    Returns:
        :class:`Result` with x, y, history and the method state.
    """
    method = _as_method(method)
    check_int("steps", steps, 0)
    check_int("checkpoint_every", checkpoint_every, 1)
    check_int("log_every", log_every, 1)
    if time_budget is not None:
        check_positive("time_budget", time_budget)
    torch.manual_seed(seed)
    x, y = validate(problem, x, y)
    params = tr.clone(x)
    optimizer = make_outer_optimizer(outer_optimizer, params.values(), outer_lr)
    distributed.broadcast_(params)  # every rank starts from rank 0's x
    state = method.init(problem, params, y)
    history: list[dict[str, Any]] = []
    start = 0
    base_counts = Counter(problem.counts)  # report this run's oracle use only
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.exists():
        start, state, history = _load(path, problem, params, optimizer, state)
    elapsed = history[-1]["seconds"] if history else 0.0
    # the logged upper loss uses the first upper batch (fixed, so rows compare), else the
    # step's task batch
    fixed_batch = None if problem.upper_data is None else next(iter(problem.upper_data))
    bar = tqdm(total=steps, initial=start, disable=not progress, desc=method.name)
    for step in range(start, steps):
        if time_budget is not None and elapsed >= time_budget:
            break
        done = step + 1
        logged = done % log_every == 0 or done == steps
        # the point hg is estimated at, kept for callbacks (a budget may end any step); copied
        # before the timer starts because it is bookkeeping, not the method's work
        hg_x = tr.clone(params) if logged or time_budget is not None else params
        tick = time.perf_counter()
        problem.next_task()
        hg, state = method.step(problem, params, state)
        hg = distributed.combine_task_shards(problem, hg)
        problem.raise_if_nonfinite(step)
        for k, p in params.items():
            p.grad = hg[k].to(p.dtype)
        optimizer.step()
        if project is not None:
            with torch.no_grad():
                project(params)
        _synchronize(params)
        elapsed += time.perf_counter() - tick
        out_of_time = time_budget is not None and elapsed >= time_budget
        logged = logged or out_of_time
        if logged:
            with problem.uncounted():
                upper = problem.upper_value(params, state.y, _eval_batch(problem, fixed_batch))
            upper = distributed.combine_task_shards(problem, {"upper": upper.detach()})["upper"]
            row: dict[str, Any] = {
                "step": done,
                "seconds": elapsed,
                "oracles": dict(problem.counts - base_counts),
                "upper_loss": float(upper),
                "peak_memory_mb": peak_memory_mb(params),
                **info_row(state),
            }
            for callback in callbacks:
                row.update(callback(StepContext(done, params, state, hg, hg_x)) or {})
            history.append(row)
            if on_log is not None:
                on_log(row)
            bar.set_postfix(upper_loss=f"{row['upper_loss']:.4g}")
        if path is not None and (done % checkpoint_every == 0 or done == steps or out_of_time):
            if distributed.is_main():
                _save(path, done, problem, params, optimizer, state, history, base_counts)
            distributed.barrier()  # no rank runs ahead of a checkpoint it may resume from
        bar.update(1)
    bar.close()
    return Result(x=tr.detach(params), y=tr.detach(state.y), history=history, state=state)


def peak_memory_mb(params: Tree) -> float:
    """Peak memory so far: allocated GPU memory on CUDA, else the process's peak resident set
    (which includes the Python and torch baseline; compare runs made in separate processes)."""
    device = next(iter(params.values())).device
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _synchronize(params: Tree) -> None:
    # Timing on a GPU needs the queued kernels finished; this is the one sync per outer step.
    device = next(iter(params.values())).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _eval_batch(problem: Problem, fixed_batch: Any) -> Any:
    return fixed_batch if problem.upper_data is not None else problem.current_task


def _save(
    path: Path,
    step: int,
    problem: Problem,
    params: Tree,
    optimizer: torch.optim.Optimizer,
    state: MethodState,
    history: list[dict[str, Any]],
    base_counts: Counter,
) -> None:
    payload = {
        "step": step,
        "x": params,
        "optimizer": optimizer.state_dict(),
        "state": {f.name: getattr(state, f.name) for f in dataclasses.fields(state)},
        "history": history,
        "counts": dict(problem.counts - base_counts),
        "batches_drawn": dict(problem.batches_drawn),
        "rng": torch.get_rng_state(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written checkpoint


def _load(
    path: Path, problem: Problem, params: Tree, optimizer: torch.optim.Optimizer, state: MethodState
) -> tuple[int, MethodState, list[dict[str, Any]]]:
    try:
        payload = torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err
    if payload["x"].keys() != params.keys():
        raise ValueError(
            f"checkpoint {path} holds x with keys {sorted(payload['x'])}, "
            f"this run has {sorted(params)}"
        )
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(payload["x"][k])
    optimizer.load_state_dict(payload["optimizer"])
    problem.counts.update(payload["counts"])
    problem.skip_batches(payload["batches_drawn"])
    problem.batches_drawn.clear()
    problem.batches_drawn.update(payload["batches_drawn"])
    torch.set_rng_state(payload["rng"])
    return payload["step"], dataclasses.replace(state, **payload["state"]), payload["history"]

"""The outer loop: estimate at fixed x (:func:`hypergrad`) and optimise x (:func:`solve`).

The outer update is not a method's business: the hypergradient is written into ``.grad`` of the
outer tensors and a ``torch.optim`` optimizer steps them. ``solve`` logs one history row per
logged step (seconds excluding logging and callbacks, cumulative oracle counts, upper loss and
whatever the callbacks return) and can checkpoint and resume.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
import pickle
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bilevel import distributed
from bilevel import tree as tr
from bilevel.checks import check_int, check_positive
from bilevel.methods.base import Method, MethodState, info_row
from bilevel.methods.base import method as make_method
from bilevel.problem import NonFiniteError, Problem, validate
from bilevel.tree import Tree


@dataclass
class StepContext:
    """What a callback sees at a logged step: the updated outer variable ``x``, the method
    state (``state.y`` the inner iterate), the estimate ``hg`` with the point ``hg_x`` it
    was computed at (x before the update), and the outer ``optimizer`` (its learning rate is
    ``optimizer.param_groups[0]["lr"]``)."""

    step: int
    x: Tree
    state: MethodState
    hg: Tree
    hg_x: Tree
    optimizer: torch.optim.Optimizer | None = None


Callback = Callable[[StepContext], "dict[str, Any] | None"]

DEFAULT_OUTER_LR = 0.05  # the README's examples; moves a log-hyperparameter ~O(1) in 100 steps

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


def outer_step(
    problem: Problem, method: Method, x: Tree, state: MethodState, step: int
) -> tuple[Tree, MethodState]:
    """One outer step's hypergradient, with every duty around ``method.step``: draw the step's
    task batch (``task_data``), step the method at ``x`` (not modified), combine the ranks'
    task shards under torch.distributed, and raise :class:`~bilevel.NonFiniteError` if an oracle
    produced NaN/Inf (``step`` names the step in the message). Returns ``(hg, state)``; a loop
    of one's own writes ``hg`` into ``.grad`` and steps its optimizer."""
    problem.next_task()
    hg, state = method.step(problem, x, state)
    hg = distributed.combine_task_shards(problem, hg)
    # an estimate whose square overflows is a divergence, not a gradient (Adam squares it)
    problem.watch("hypergradient (squared)", {k: v * v for k, v in hg.items()})
    problem.raise_if_nonfinite(step)
    return hg, state


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
        hg, state = outer_step(problem, method, x, state, step)
    return tr.detach(hg)


OptimizerSpec = str | type[torch.optim.Optimizer] | functools.partial | torch.optim.Optimizer
SchedulerSpec = (
    torch.optim.lr_scheduler.LRScheduler
    | Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
    | None
)


def make_outer_optimizer(
    spec: str | type[torch.optim.Optimizer] | functools.partial,
    params: Iterable[torch.Tensor],
    lr: float | None,
) -> torch.optim.Optimizer:
    """Build the outer optimizer from a name ("adam", "sgd"), a ``torch.optim.Optimizer``
    subclass or a ``functools.partial`` of one, with learning rate ``lr`` (default
    :data:`DEFAULT_OUTER_LR`; a partial that sets ``lr`` keeps it).

    A bare class is built with ``weight_decay=0`` where it takes one: ``torch.optim.AdamW``'s
    default decay of 0.01 would silently pull hyperparameters (log-weights, per-sample weights)
    towards 0. Ask for decay explicitly: ``functools.partial(torch.optim.AdamW,
    weight_decay=0.01)`` or an optimizer instance.
    """
    if isinstance(spec, str):
        if spec not in OUTER_OPTIMIZERS:
            raise ValueError(
                f"unknown outer_optimizer {spec!r}; choose {', '.join(OUTER_OPTIMIZERS)} "
                "or pass a torch.optim.Optimizer class, a functools.partial of one or an instance"
            )
        spec = OUTER_OPTIMIZERS[spec]
    cls = spec.func if isinstance(spec, functools.partial) else spec
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise TypeError(
            "outer_optimizer must be a name, a torch.optim.Optimizer class, a functools.partial "
            f"of one or an instance, got {spec!r}"
        )
    fixed = spec.keywords if isinstance(spec, functools.partial) else {}
    options: dict[str, Any] = {}
    if "lr" in fixed:
        if lr is not None:
            raise ValueError("outer_lr given twice: in outer_optimizer's partial and as outer_lr")
    else:
        options["lr"] = DEFAULT_OUTER_LR if lr is None else lr
        check_positive("outer_lr", options["lr"])
    if "weight_decay" not in fixed and "weight_decay" in inspect.signature(cls).parameters:
        options["weight_decay"] = 0.0
    return spec(list(params), **options)


def _outer_params(
    spec: OptimizerSpec, x: Tree, lr: float | None
) -> tuple[Tree, torch.optim.Optimizer]:
    """The tensors solve() updates and the optimizer that updates them: with an optimizer
    instance, x's own tensors (in place); otherwise detached copies of x."""
    if not isinstance(spec, torch.optim.Optimizer):
        params = tr.clone(x)
        return params, make_outer_optimizer(spec, params.values(), lr)
    if lr is not None:
        raise ValueError(
            "outer_lr is for an optimizer name or class; an optimizer instance has its own lr"
        )
    owned = [p for group in spec.param_groups for p in group["params"]]
    if {id(p) for p in owned} != {id(t) for t in x.values()} or len(owned) != len(x):
        raise ValueError(
            "the outer_optimizer instance must optimise exactly the tensors of x: build it "
            "from them (e.g. x = dict(module.named_parameters()); "
            "torch.optim.Adam(module.parameters()))"
        )
    return x, spec


def _scheduler(
    spec: SchedulerSpec, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LRScheduler | None:
    if spec is None:
        return None
    if not isinstance(spec, torch.optim.lr_scheduler.LRScheduler):
        if not callable(spec):
            raise TypeError(
                "scheduler must be a torch.optim.lr_scheduler instance or a callable "
                f"optimizer -> scheduler, got {type(spec).__name__}"
            )
        spec = spec(optimizer)
        if not isinstance(spec, torch.optim.lr_scheduler.LRScheduler):
            raise TypeError("the scheduler callable must return a torch.optim.lr_scheduler")
    if spec.optimizer is not optimizer:
        raise ValueError(
            "the scheduler steps another optimizer: build it on the outer_optimizer instance "
            "passed to solve, or pass a callable optimizer -> scheduler"
        )
    return spec


def solve(
    problem: Problem,
    x: Tree,
    y: Tree | None,
    method: Method | str,
    steps: int,
    outer_optimizer: OptimizerSpec = "adam",
    outer_lr: float | None = None,
    scheduler: SchedulerSpec = None,
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
        outer_optimizer: "adam", "sgd", a ``torch.optim.Optimizer`` class or
            ``functools.partial`` of one (built on copies of x with ``outer_lr``, see
            :func:`make_outer_optimizer`), or an optimizer instance whose parameters are
            exactly x's tensors: those are then updated in place (an ``nn.Module`` holding
            the hyperparameters sees them change), with the instance's param groups and lr.
        outer_lr: learning rate for a name or class (default 0.05); not allowed with an
            instance.
        scheduler: a ``torch.optim.lr_scheduler`` instance on the optimizer instance, or a
            callable ``optimizer -> scheduler``; stepped once per outer step.
        callbacks: ``cb(ctx: StepContext) -> dict | None``, called at each logged step outside
            the timed region; returned keys are added to the history row.
        checkpoint: file to save to every ``checkpoint_every`` steps and at the end (x, the
            method state, optimizer and scheduler state, RNG, batch positions); if it exists,
            the run resumes from it bit-exactly (same problem, method and arguments expected).
        project: in-place projection of x after each outer update (e.g. onto a box).
        log_every: log a history row every this many steps (and at the last step).
        progress: show a progress bar (needs tqdm, in the ``bench`` extra).
        time_budget: stop after the first step at which the timed seconds (method and outer
            update, not logging) reach this budget; that step is logged.
        on_log: called with each history row as soon as it is complete (e.g. to stream rows
            to a file, so an interrupted run keeps them).
    Returns:
        :class:`Result` with x, y (detached copies), history and the method state.
    """
    method = _as_method(method)
    check_int("steps", steps, 0)
    check_int("checkpoint_every", checkpoint_every, 1)
    check_int("log_every", log_every, 1)
    if time_budget is not None:
        check_positive("time_budget", time_budget)
    torch.manual_seed(seed)
    x, y = validate(problem, x, y)
    params, optimizer = _outer_params(outer_optimizer, x, outer_lr)
    lr_scheduler = _scheduler(scheduler, optimizer)
    point = tr.detach(params)  # what the method sees: the same storage, no autograd history
    distributed.broadcast_(point)  # every rank starts from rank 0's x
    state = method.init(problem, point, y)
    history: list[dict[str, Any]] = []
    start = 0
    base_counts = Counter(problem.counts)  # report this run's oracle use only
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.exists():
        start, state, history = _load(path, problem, point, optimizer, lr_scheduler, state)
    elapsed = history[-1]["seconds"] if history else 0.0  # wall seconds of the method steps
    cpu_elapsed = history[-1].get("cpu_seconds", 0.0) if history else 0.0  # their CPU seconds
    # the logged upper loss uses the first upper batch (fixed, so rows compare), else the
    # step's task batch
    fixed_batch = None if problem.upper_data is None else next(iter(problem.upper_data))
    bar = _progress_bar(progress, method.name, steps, start, time_budget, elapsed)
    for step in range(start, steps):
        if time_budget is not None and elapsed >= time_budget:
            break
        done = step + 1
        logged = done % log_every == 0 or done == steps
        # the point hg is estimated at, kept for callbacks (a budget may end any step); copied
        # before the timer starts because it is bookkeeping, not the method's work
        hg_x = tr.clone(point) if logged or time_budget is not None else point
        tick, cpu_tick = time.perf_counter(), time.process_time()
        hg, state = outer_step(problem, method, point, state, step)
        for k, p in params.items():
            p.grad = hg[k].to(p.dtype)
        optimizer.step()
        if lr_scheduler is not None:
            lr_scheduler.step()
        if project is not None:
            with torch.no_grad():
                returned = project(point)
            if returned is not None:
                raise TypeError(
                    "project must modify x in place and return None; it returned a "
                    f"{type(returned).__name__} (a new x is ignored, so the projection would "
                    "silently not apply)"
                )
        _synchronize(point)
        elapsed += time.perf_counter() - tick
        cpu_elapsed += time.process_time() - cpu_tick
        out_of_time = time_budget is not None and elapsed >= time_budget
        logged = logged or out_of_time
        if logged:
            with problem.uncounted():
                upper = problem.upper_value(point, state.y, _eval_batch(problem, fixed_batch))
            upper = distributed.combine_task_shards(problem, {"upper": upper.detach()})["upper"]
            row: dict[str, Any] = {
                "step": done,
                "seconds": elapsed,
                "cpu_seconds": cpu_elapsed,
                "oracles": dict(problem.counts - base_counts),
                "upper_loss": float(upper),
                "peak_memory_mb": peak_memory_mb(point),
                **info_row(state),
            }
            context = StepContext(done, point, state, hg, hg_x, optimizer)
            for callback in callbacks:
                row.update(_metrics(callback, context))
            _raise_if_nonfinite_row(row, point)
            history.append(row)
            if on_log is not None:
                on_log(row)
            if bar is not None:
                bar.set_postfix(upper_loss=f"{row['upper_loss']:.4g}")
        if path is not None and (done % checkpoint_every == 0 or done == steps or out_of_time):
            if distributed.is_main():
                _save(path, done, problem, point, optimizer, lr_scheduler, state, history,
                      base_counts)  # fmt: skip
            distributed.barrier()  # no rank runs ahead of a checkpoint it may resume from
        if bar is not None:
            bar.update(min(elapsed, time_budget) - bar.n if time_budget is not None else 1)
    if bar is not None:
        bar.close()
    return Result(x=tr.clone(point), y=tr.detach(state.y), history=history, state=state)


def _progress_bar(
    progress: bool, name: str, steps: int, start: int, budget: float | None, elapsed: float
) -> Any:
    """Steps done of ``steps``, or with a time budget, seconds used of the budget; ``None``
    without ``progress`` (tqdm is imported only then: it is a ``bench`` extra)."""
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError as err:
        raise ImportError(
            "progress=True needs tqdm: pip install tqdm (or the bench extra)"
        ) from err
    if budget is None:
        return tqdm(total=steps, initial=start, desc=name)
    return tqdm(total=budget, initial=min(elapsed, budget), desc=name, unit="s",
                bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s{postfix}")  # fmt: skip


def _metrics(callback: Callback, ctx: StepContext) -> dict[str, Any]:
    """The callback's metrics; anything but a dict or None breaks the callback contract."""
    out = callback(ctx)
    if out is None:
        return {}
    if not isinstance(out, dict):
        name = getattr(callback, "__name__", type(callback).__name__)
        raise TypeError(
            f"callback {name} must return a dict of metrics or None, got {type(out).__name__}"
        )
    return out


def _raise_if_nonfinite_row(row: dict[str, Any], params: Tree) -> None:
    """A logged step with a NaN/Inf loss, metric or x is an error at that step, never a row."""
    bad = [f"{k}={v}" for k, v in row.items()
           if isinstance(v, float) and not math.isfinite(v)]  # fmt: skip
    if not bool(tr.all_finite(params)):
        bad.append("x")
    if bad:
        raise NonFiniteError(
            f"non-finite {', '.join(bad)} at outer step {row['step'] - 1} (logged as step "
            f"{row['step']}); the run diverges "
            "(lower inner_lr or outer_lr) or the losses overflow"
        )


def peak_memory_mb(params: Tree) -> float:
    """Peak memory so far: allocated GPU memory on CUDA, else the process's peak resident set
    (which includes the Python and torch baseline; compare runs made in separate processes)."""
    device = tr.device(params)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource  # POSIX only: imported here, so `import bilevel` works everywhere

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _synchronize(params: Tree) -> None:
    # Timing on a GPU needs the queued kernels finished; this is the one sync per outer step.
    device = tr.device(params)
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
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    state: MethodState,
    history: list[dict[str, Any]],
    base_counts: Counter,
) -> None:
    payload = {
        "state_class": type(state).__name__,
        "step": step,
        "x": params,
        "optimizer": optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
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


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: unreadable, refused or from another run."""


CHECKPOINT_KEYS = ("step", "x", "optimizer", "state", "history", "counts", "batches_drawn", "rng")


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`solve`, with tensors and plain data only
    (``weights_only=True``: a file holding code is refused, never run). Raises
    :class:`CheckpointError` with one line saying what is wrong."""
    try:
        payload = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"unsupported GLOBAL (\S+)|Unsupported global: GLOBAL (\S+)", str(err))
        what = f" ({next(g for g in found.groups() if g)})" if found else ""
        raise CheckpointError(
            f"cannot read checkpoint {path}: refused, it holds Python objects other than "
            f"tensors and plain data{what}; only checkpoints bilevel writes are loaded, and "
            "loading never runs code"
        ) from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as err:
        detail = str(err).split(". ")[0].strip() or type(err).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is truncated or corrupt ({detail}); restore "
            "it, or delete it to start again from step 0"
        ) from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise CheckpointError(
            f"{path} is not a bilevel checkpoint (it lacks {', '.join(missing)})"
        )
    return payload


def _load(
    path: Path,
    problem: Problem,
    params: Tree,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    state: MethodState,
) -> tuple[int, MethodState, list[dict[str, Any]]]:
    payload = load_checkpoint(path)
    written_by = payload.get("state_class", type(state).__name__)
    unknown = set(payload["state"]) - {f.name for f in dataclasses.fields(state)}
    if written_by != type(state).__name__ or unknown:
        raise CheckpointError(
            f"checkpoint {path} was written by another kind of method (its state is "
            f"{written_by}, this method's is {type(state).__name__}); resume with the method "
            "that wrote it"
        )
    if payload["x"].keys() != params.keys():
        raise ValueError(
            f"checkpoint {path} holds x with keys {sorted(payload['x'])}, "
            f"this run has {sorted(params)}"
        )
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(payload["x"][k])
    optimizer.load_state_dict(payload["optimizer"])
    saved_scheduler = payload.get("scheduler")
    if (saved_scheduler is None) != (scheduler is None):
        raise ValueError(
            f"checkpoint {path} was written {'without' if saved_scheduler is None else 'with'} "
            "a scheduler; resume with the same arguments"
        )
    if scheduler is not None:
        scheduler.load_state_dict(saved_scheduler)
    problem.counts.update(payload["counts"])
    problem.skip_batches(payload["batches_drawn"])
    problem.batches_drawn.clear()
    problem.batches_drawn.update(payload["batches_drawn"])
    torch.set_rng_state(payload["rng"])
    return payload["step"], dataclasses.replace(state, **payload["state"]), payload["history"]

"""Scale-out with torch.distributed: tasks and ES directions split across ranks.

Launch with ``torchrun --nproc-per-node R script.py`` (or ``bilevel run ... --nproc R``); call
:func:`init` once at the start. Every rank builds the same problem from the same seed, so all
ranks draw the same meta-batch and the same random directions; each rank then works on its
share only:

- ``tasks``: :func:`shard_tasks` gives each rank a contiguous slice of every meta-batch and
  rescales mean-over-tasks losses so the ranks' losses add up to the full one;
  :func:`bilevel.solve` sums the ranks' hypergradients.
- ``directions``: evolution-strategies methods split their Q directions by :func:`shard`
  and sum the per-direction terms with one all-reduce (no problem change needed).

x stays identical on every rank: the same start, the same all-reduced hypergradient and the
same optimizer. Rank 0 alone writes checkpoints; every rank reads them on resume.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from bilevel import tree as tr
from bilevel.tree import Tree

if TYPE_CHECKING:
    from bilevel.problem import Problem


def is_active() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes files."""
    return rank() == 0


def init(backend: str | None = None) -> None:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...);
    a no-op when the script was not launched by torchrun. ``backend`` defaults to nccl on CUDA
    machines, gloo otherwise."""
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def close() -> None:
    """Leave the process group cleanly: wait for every rank, then tear it down (a rank that
    exits while another still talks to it can abort the other)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard(n: int) -> range:
    """This rank's contiguous share of ``range(n)``; shares differ in size by at most one."""
    base, extra = divmod(n, world_size())
    r = rank()
    start = r * base + min(r, extra)
    return range(start, start + base + (r < extra))


def all_reduce_sum(t: Tree) -> Tree:
    """Sum of a tree over ranks, in one collective on the flattened tree."""
    if not is_active():
        return t
    flat = tr.flatten(t).clone()
    dist.all_reduce(flat)
    return tr.unflatten(flat, t)


def all_reduce_mean(t: Tree) -> Tree:
    """Average of a tree over ranks."""
    if not is_active():
        return t
    return tr.scale(all_reduce_sum(t), 1.0 / world_size())


def broadcast_(t: Tree, src: int = 0) -> None:
    """Overwrite ``t`` in place with rank ``src``'s values."""
    if is_active():
        for value in t.values():
            dist.broadcast(value.data, src)


def shared_seed(device: torch.device | str = "cpu") -> int:
    """A seed drawn from torch's global RNG (which ``bl.solve(seed=...)`` seeds), rank 0's on
    every rank so that all ranks draw the same directions or noise (one host read)."""
    seed = {"seed": torch.randint(0, 2**62, (), dtype=torch.int64).to(device)}
    broadcast_(seed)
    return int(seed["seed"])


def barrier() -> None:
    if is_active():
        dist.barrier()


def slice_batch(batch: Any, part: range) -> Any:
    """Rows ``part`` (leading dim) of every tensor in a batch: a tensor, a tuple, list or dict
    of them, or a dataclass (such as an episode) holding them."""
    if isinstance(batch, Tensor):
        return batch[part.start : part.stop]
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
        return dataclasses.replace(batch, **{k: slice_batch(v, part) for k, v in fields.items()})
    if isinstance(batch, dict):
        return {k: slice_batch(v, part) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a NamedTuple
        return type(batch)(*(slice_batch(v, part) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(slice_batch(v, part) for v in batch)
    return batch


class _Shards:
    """An iterable of batches, each cut to this rank's share of its rows."""

    def __init__(self, data: Iterable, what: str) -> None:
        self.data, self.what = data, what

    def __iter__(self) -> Iterator[Any]:
        for batch in self.data:
            rows = leading_size(batch)
            if rows % world_size():
                raise ValueError(
                    f"a {self.what} of {rows} does not split evenly over {world_size()} ranks; "
                    f"choose a {self.what} divisible by the number of ranks"
                )
            yield slice_batch(batch, shard(rows))


def leading_size(batch: Any) -> int:
    """The leading dimension of the first tensor in a batch."""
    if isinstance(batch, Tensor):
        return batch.shape[0]
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        values = [getattr(batch, f.name) for f in dataclasses.fields(batch)]
    elif isinstance(batch, dict):
        values = list(batch.values())
    elif isinstance(batch, list | tuple):
        values = list(batch)
    else:
        values = []
    for value in values:
        try:
            return leading_size(value)
        except TypeError:
            continue
    raise TypeError(f"cannot split a batch of type {type(batch).__name__}: no tensor in it")


def shard_tasks(problem: Problem, upper: str = "mean", lower: str = "sum") -> Problem:
    """Give this rank its share of each meta-batch (in place; returns the problem).

    ``upper`` / ``lower`` say how each loss combines the tasks of a meta-batch: ``"mean"``
    (the usual upper loss) or ``"sum"`` (the usual lower loss: each task's head gets its own
    gradient). A mean is rescaled by 1/ranks on every rank, so the ranks' losses add up to the
    full meta-batch's loss exactly and the inner dynamics — BDA's aggregated steps included —
    are the single-process ones; :func:`bilevel.solve` then sums the ranks' hypergradients.
    ``init_lower`` must size y for ``meta_batch // world_size()`` tasks.
    """
    if problem.task_data is None:
        raise ValueError("shard_tasks needs a problem with task_data (one meta-batch per step)")
    for name, how in (("upper", upper), ("lower", lower)):
        if how not in ("mean", "sum"):
            raise ValueError(f"{name} must be 'mean' or 'sum' over tasks, got {how!r}")
    if is_active():
        problem.task_data = _Shards(problem.task_data, "meta-batch")
        if upper == "mean":
            problem.upper = _scaled(problem.upper, 1.0 / world_size())
        if lower == "mean":
            problem.lower = _scaled(problem.lower, 1.0 / world_size())
        problem.combine = all_reduce_sum
    return problem


def combine_task_shards(problem: Problem, t: Tree) -> Tree:
    """The full meta-batch's value (hypergradient, upper loss) from this rank's share: the sum
    over ranks when the problem's tasks are split (:func:`shard_tasks`), else ``t`` itself."""
    return t if problem.combine is None else problem.combine(t)


def _scaled(loss, factor: float):
    def scaled(x: Tree, y: Tree, batch: Any) -> Tensor:
        return loss(x, y, batch) * factor

    return scaled


def shard_data(problem: Problem) -> Problem:
    """Data-parallel inner problem: each rank keeps its slice of every lower and upper batch,
    and every oracle returns the mean over ranks (one all-reduce per
    oracle call, as DistributedDataParallel does for a training step). The losses must be
    means over the batch. For methods that do not differentiate through oracle calls (esj_s,
    soba, stocbio, amigo, cg, sgld, ...); unrolled methods (itd, bda) need ``shard_tasks``."""
    if problem.lower_data is None and problem.upper_data is None:
        raise ValueError("shard_data needs a problem with lower_data or upper_data batches")
    if is_active():
        for which in ("lower_data", "upper_data"):
            data = getattr(problem, which)
            if data is not None:
                setattr(problem, which, _Shards(data, "batch size"))
        problem.reduce = all_reduce_mean
    return problem

"""torch.distributed on CPU (gloo, 2 processes): sharded runs equal one process."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bilevel as bl
from bilevel import distributed

TASKS = 8


@dataclass
class Episode:
    support_x: torch.Tensor  # [tasks, n, d]
    support_y: torch.Tensor  # [tasks, n]
    query_x: torch.Tensor
    query_y: torch.Tensor


def episodes(seed: int = 0):
    """A seeded endless stream of meta-batches of linear-regression tasks."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        w = torch.randn(TASKS, 3, 1, generator=gen, dtype=torch.float64)
        sx, qx = (torch.randn(TASKS, 6, 3, generator=gen, dtype=torch.float64) for _ in range(2))
        yield Episode(sx, (sx @ w).squeeze(-1), qx, (qx @ w).squeeze(-1))


def meta_problem() -> bl.Problem:
    """MAML-style: y (one weight vector per task) starts at x; the lower loss sums the tasks'
    support losses plus a nonlinear penalty; the upper loss averages query losses."""

    def lower(x, y, ep):
        pred = torch.einsum("tnd,td->tn", ep.support_x, y["w"])
        return ((pred - ep.support_y) ** 2).mean(1).sum() + 0.1 * torch.cosh(y["w"]).sum()

    def upper(x, y, ep):
        pred = torch.einsum("tnd,td->tn", ep.query_x, y["w"])
        return ((pred - ep.query_y) ** 2).mean()

    problem = bl.Problem(upper, lower, task_data=_Stream())

    def init_lower(x):  # one copy of x per task this process holds
        tasks = TASKS // distributed.world_size()
        return {"w": x["w"].unsqueeze(0).expand(tasks, -1)}

    problem.init_lower = init_lower
    return problem


class _Stream:
    def __iter__(self):
        return episodes()


def x0() -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)}


def run_meta(method: str) -> torch.Tensor:
    """x after 3 outer steps on meta-batches of 8 tasks, split over the ranks."""
    problem = distributed.shard_tasks(meta_problem())
    options = {"inner_steps": 4, "inner_lr": 0.1}
    result = bl.solve(
        problem, x0(), None, bl.method(method, **options), steps=3, outer_optimizer="sgd",
        outer_lr=0.1,
    )  # fmt: skip
    return result.x["w"]


def run_data(method: str) -> torch.Tensor:
    """The hypergradient of a weighted logistic regression whose mini-batches of 12 rows
    are split over the ranks (each oracle averaged over ranks)."""
    gen = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(12, 4, generator=gen, dtype=torch.float64),
            torch.randint(0, 2, (12,), generator=gen),
        )
        for _ in range(3)
    ]

    def lower(x, y, batch):
        a, b = batch
        margin = (2 * b - 1) * (a @ y["w"])
        return (torch.nn.functional.softplus(-margin)).mean() + 0.5 * (
            x["l"].exp() * y["w"] ** 2
        ).sum()

    def upper(x, y, batch):
        a, b = batch
        return torch.nn.functional.softplus(-(2 * b - 1) * (a @ y["w"])).mean()

    problem = distributed.shard_data(
        bl.Problem(upper, lower, upper_data=batches, lower_data=batches)
    )
    x = {"l": torch.zeros(4, dtype=torch.float64)}
    y = {"w": torch.zeros(4, dtype=torch.float64)}
    options = {"inner_steps": 5, "inner_lr": 0.5, "solver_iters": 5}
    return bl.hypergrad(problem, x, y, bl.method(method, **options), steps=3)["l"]


def run_es(method: str, seed: int | None = 0) -> torch.Tensor:
    """An ESJ hypergradient with Q = 8 directions, split over the ranks (``seed=None``: the
    direction seed drawn from each process's global RNG, which differ here)."""
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(20, 5, generator=gen, dtype=torch.float64)
    b = torch.randint(0, 2, (20,), generator=gen).double()

    def lower(x, y, _):
        margin = (2 * b - 1) * (a @ y["w"])
        return (
            torch.nn.functional.softplus(-margin).mean() + 0.5 * (x["l"].exp() * y["w"] ** 2).sum()
        )

    def upper(x, y, _):
        return ((a @ y["w"] - b) ** 2).mean()

    problem = bl.Problem(upper, lower)
    x = {"l": torch.full((5,), -1.0, dtype=torch.float64)}
    y = {"w": torch.zeros(5, dtype=torch.float64)}
    options = {"inner_steps": 10, "inner_lr": 0.5, "directions": 8, "radius": 1e-3, "seed": seed}
    return bl.hypergrad(problem, x, y, bl.method(method, **options), steps=2)["l"]


def run_es_drawn_seed(method: str) -> torch.Tensor:
    torch.manual_seed(distributed.rank())  # ranks' global RNGs disagree on purpose
    return run_es(method, seed=None)


CASES = {"meta": run_meta, "data": run_data, "es": run_es, "es_drawn": run_es_drawn_seed}


def _worker(rank: int, world: int, init_file: str, out: str, case: str, method: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        value = CASES[case](method)
        gathered = [torch.empty_like(value) for _ in range(world)]
        dist.all_gather(gathered, value)
        if rank == 0:
            torch.save(gathered, out)
    finally:
        distributed.close()
    # The result is on disk and the group is closed. Skip the interpreter's teardown: about one
    # spawned gloo worker in ten aborts there ("terminate called without an active
    # exception", no Python frame) under pytest, after all its work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def two_ranks_match_one_process(tmp_path: Path, case: str, method: str) -> torch.Tensor:
    """Run ``case`` in this process and on 2 gloo ranks: both ranks must hold the same result,
    equal to the single process's up to the order of float sums. Returns the single result."""
    single = CASES[case](method)
    out = tmp_path / f"{case}-{method}.pt"
    init = str(tmp_path / f"init-{case}-{method}")
    mp.spawn(_worker, args=(2, init, str(out), case, method), nprocs=2)
    per_rank = torch.load(out)
    torch.testing.assert_close(per_rank[0], per_rank[1], rtol=0, atol=0)  # identical on ranks
    torch.testing.assert_close(per_rank[0], single, rtol=0, atol=1e-10)
    return single


@pytest.mark.parametrize("method", ["itd", "bda"])
def test_two_ranks_split_the_meta_batch_like_one_process(tmp_path, method):
    single = two_ranks_match_one_process(tmp_path, "meta", method)
    assert not torch.equal(single, x0()["w"])  # the outer steps really moved x


@pytest.mark.parametrize("method", ["cg"])
def test_two_ranks_split_each_batch_like_one_process(tmp_path, method):
    single = two_ranks_match_one_process(tmp_path, "data", method)
    assert single.abs().max() > 1e-3


def test_shard_covers_every_index_once(monkeypatch):
    parts = []
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        monkeypatch.setattr(distributed, "world_size", lambda: 3)
        parts.append(list(distributed.shard(10)))
    assert parts == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_slice_batch_cuts_every_tensor_of_a_dataclass():
    ep = next(episodes())
    part = distributed.slice_batch(ep, range(2, 5))
    assert part.support_x.shape == (3, 6, 3)
    torch.testing.assert_close(part.query_y, ep.query_y[2:5])


def test_single_process_is_untouched():
    problem = meta_problem()
    assert distributed.shard_tasks(problem).combine is None
    assert distributed.world_size() == 1 and distributed.is_main()


@pytest.mark.parametrize("method", ["esj", "hozog"])
def test_two_ranks_split_the_directions_like_one_process(tmp_path, method):
    single = two_ranks_match_one_process(tmp_path, "es", method)
    assert single.abs().max() > 1e-3


def test_ranks_share_rank_zeros_drawn_direction_seed(tmp_path):
    out, init = tmp_path / "drawn.pt", str(tmp_path / "init-drawn")
    mp.spawn(_worker, args=(2, init, str(out), "es_drawn", "esj"), nprocs=2)
    per_rank = torch.load(out)
    torch.testing.assert_close(per_rank[0], per_rank[1], rtol=0, atol=0)

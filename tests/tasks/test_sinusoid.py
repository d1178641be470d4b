"""MAML sinusoid regression: task stream, hypergradients and a short meta-training run."""

from __future__ import annotations

import math

import torch

import bilevel as bl
from bilevel.tasks.sinusoid import sinusoid

from helpers import relative_error


def test_tasks_are_seeded_restartable_and_in_range() -> None:
    task = sinusoid(meta_batch=5)
    stream = iter(task.problem.task_data)
    a, b = next(stream), next(stream)
    assert a.support_x.shape == (5, 10, 1) and a.query_y.shape == (5, 10, 1)
    assert not torch.equal(a.support_x, b.support_x)
    again = next(iter(task.problem.task_data))
    assert all(torch.equal(u, v) for u, v in zip(a, again, strict=True))
    big = next(iter(sinusoid(meta_batch=500).problem.task_data))
    assert float(big.amplitude.min()) >= 0.1 and float(big.amplitude.max()) <= 5
    assert float(big.phase.min()) >= 0 and float(big.phase.max()) <= math.pi
    assert float(big.support_x.abs().max()) <= 5
    expected = big.amplitude[:, None, None] * torch.sin(big.query_x - big.phase[:, None, None])
    assert torch.allclose(big.query_y, expected, atol=1e-5)


def test_itd_is_finite_and_matches_forward_mode() -> None:
    def task() -> bl.tasks.Task:
        return sinusoid(meta_batch=3, hidden=5, dtype=torch.float64)

    options = {"inner_steps": 2, "inner_lr": 0.01}
    first = task()
    itd = bl.hypergrad(first.problem, first.x0, None, bl.method("itd", **options))
    assert itd.keys() == first.x0.keys()
    assert all(v.shape == first.x0[k].shape and torch.isfinite(v).all() for k, v in itd.items())
    fwd = bl.hypergrad(task().problem, first.x0, None, bl.method("forward", **options))
    assert relative_error(itd, fwd) < 1e-8


def test_meta_training_lowers_post_adaptation_mse() -> None:
    task = sinusoid(meta_batch=10)
    method = bl.method("itd", **task.method_options("itd"))
    result = bl.solve(
        task.problem, task.x0, None, method, steps=60, outer_lr=0.01, callbacks=task.callbacks
    )
    start = task.callbacks[0](bl.StepContext(0, task.x0, None, None, None))
    end = result.history[-1]["post_adaptation_mse"]
    assert end < 0.8 * start["post_adaptation_mse"]


def test_resume_replays_the_task_stream(tmp_path) -> None:
    method = bl.method("itd", inner_steps=1, inner_lr=0.01)
    full = bl.solve(sinusoid().problem, sinusoid().x0, None, method, steps=6, outer_lr=0.01)
    path = tmp_path / "ck.pt"
    task = sinusoid()
    bl.solve(task.problem, task.x0, None, method, steps=4, outer_lr=0.01, checkpoint=path)
    task = sinusoid()
    resumed = bl.solve(task.problem, task.x0, None, method, steps=6, outer_lr=0.01, checkpoint=path)
    assert all(torch.equal(full.x[k], resumed.x[k]) for k in full.x)

"""The outer loop: history, callbacks, projection, checkpoint and resume."""

import pytest
import torch

import bilevel as bl
from bilevel.tasks import quadratic


def _task():
    return quadratic(dim_x=3, dim_y=6, condition=4.0, seed=0, outer_strength=1.0)


def test_solve_decreases_the_outer_objective_and_logs():
    task = _task()
    data = task.metadata["data"]
    result = bl.solve(
        task.problem,
        task.x0,
        task.y0,
        bl.method("cg", inner_steps=30, inner_lr=1.0),
        steps=60,
        outer_lr=0.05,
        callbacks=task.callbacks,
    )
    assert float(data.value(result.x)) < float(data.value(task.x0))
    last = result.history[-1]
    keys = {"step", "seconds", "cpu_seconds", "oracles", "upper_loss", "hypergrad_error"}
    assert set(last) >= keys
    assert last["step"] == 60 and last["hypergrad_error"] < 1e-3
    seconds = [row["seconds"] for row in result.history]
    assert seconds == sorted(seconds)
    # the caller's tensors are untouched
    assert torch.equal(task.x0["x"], _task().x0["x"])


def test_solve_reaches_the_stationary_point():
    task = _task()
    data = task.metadata["data"]
    eig = torch.linalg.eigvalsh(data.outer_hessian())
    assert float(eig.min()) == pytest.approx(1.0)  # strongly convex by construction
    steps = int(12 * float(eig.max() / eig.min()))  # GD with lr 1/L: error * (1 - 1/kappa)^t
    result = bl.solve(
        task.problem,
        task.x0,
        task.y0,
        bl.method("cg", inner_steps=60, inner_lr=1.0),
        steps=steps,
        outer_optimizer="sgd",
        outer_lr=1 / float(eig.max()),
        log_every=steps,
    )
    assert float(torch.linalg.norm(data.hypergradient(result.x)["x"])) < 1e-5


def test_outer_optimizer_class_and_projection_and_log_every():
    task = _task()

    def box(x):
        x["x"].clamp_(-0.1, 0.1)

    result = bl.solve(
        task.problem,
        task.x0,
        task.y0,
        "cg",
        steps=7,
        log_every=3,
        outer_optimizer=torch.optim.RMSprop,
        outer_lr=0.5,
        project=box,
    )
    assert [row["step"] for row in result.history] == [3, 6, 7]
    assert float(result.x["x"].abs().max()) <= 0.1


@pytest.mark.parametrize("name", ["itd", "cg", "fixed_point"])
def test_checkpoint_resume_is_bit_exact(tmp_path, name):
    method = bl.method(name, inner_steps=5, inner_lr=0.5)
    full = bl.solve(_task().problem, _task().x0, _task().y0, method, steps=10, outer_lr=0.05)
    path = tmp_path / "run.pt"
    # an "interrupted" run: stops after 6 steps, having checkpointed at 3 and 6
    bl.solve(
        _task().problem,
        _task().x0,
        _task().y0,
        method,
        steps=6,
        outer_lr=0.05,
        checkpoint=path,
        checkpoint_every=3,
    )
    resumed = bl.solve(
        _task().problem,
        _task().x0,
        _task().y0,
        method,
        steps=10,
        outer_lr=0.05,
        checkpoint=path,
        checkpoint_every=3,
    )
    assert torch.equal(resumed.x["x"], full.x["x"])
    assert torch.equal(resumed.y["y"], full.y["y"])
    assert [r["step"] for r in resumed.history] == list(range(1, 11))
    # seconds and the process's peak memory are measurements, not results of the run
    measured = ("seconds", "cpu_seconds", "peak_memory_mb")
    strip = [{k: v for k, v in r.items() if k not in measured} for r in resumed.history]
    assert strip == [{k: v for k, v in r.items() if k not in measured} for r in full.history]


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        bl.solve(_task().problem, _task().x0, _task().y0, "cg", steps=2, checkpoint=path)


def test_stochastic_problem_cycles_batches():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    t = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    batches = [(X[i : i + 10], t[i : i + 10]) for i in range(0, 40, 10)]
    problem = bl.Problem(
        upper=lambda x, y, b: torch.mean((b[0] @ y["w"] - b[1]) ** 2),
        lower=lambda x, y, b: (
            torch.mean((b[0] @ y["w"] - b[1]) ** 2) + torch.exp(x["l"]) * torch.sum(y["w"] ** 2)
        ),
        upper_data=batches,
        lower_data=batches,
    )
    result = bl.solve(
        problem,
        {"l": torch.tensor(0.0, dtype=torch.float64)},
        {"w": torch.zeros(3, dtype=torch.float64)},
        bl.method("cg", inner_steps=10),
        steps=5,
        outer_lr=0.1,
    )
    assert problem.batches_drawn["lower"] == 5 * 11 and problem.batches_drawn["upper"] == 5
    assert result.history[-1]["upper_loss"] < result.history[0]["upper_loss"] + 1.0


def test_time_budget_stops_and_logs_the_last_step():
    task = _task()
    rows = []
    result = bl.solve(
        task.problem,
        task.x0,
        task.y0,
        bl.method("itd", inner_steps=50),
        steps=10_000,
        log_every=10_000,
        time_budget=0.5,
        on_log=rows.append,
    )
    assert rows == result.history and len(rows) == 1
    assert 0.5 <= rows[0]["seconds"] < 5 and rows[0]["step"] < 10_000
    assert rows[0]["peak_memory_mb"] > 0
    with pytest.raises(ValueError, match="time_budget"):
        bl.solve(task.problem, task.x0, task.y0, "cg", steps=1, time_budget=0)

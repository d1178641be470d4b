"""l2_regularization: splits, hypergradient vs finite differences, cg improves validation."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, hessian

import bilevel as bl
from bilevel import tree as tr
from bilevel.tasks.l2_regularization import l2_regularization


def inner_fit(task, x, steps: int = 15):
    """y*(x) by Newton's method on the flattened lower loss (independent of the methods)."""

    def lower(flat):
        return task.problem.lower(x, tr.unflatten(flat, task.y0), None)

    flat = tr.flatten(task.y0)
    for _ in range(steps):
        flat = flat - torch.linalg.solve(hessian(lower)(flat), grad(lower)(flat))
    return tr.unflatten(flat, task.y0)


def gd_fit(task, x, steps: int = 400):
    """An approximate y*(x) by plain gradient descent (cheap for many classes)."""
    lower = grad(lambda y_: task.problem.lower(x, y_, None))
    lr = task.method_defaults["inner_lr"]
    y = dict(task.y0)
    for _ in range(steps):
        g = lower(y)
        y = {k: y[k] - lr * g[k] for k in y}
    return y


def test_shapes_splits_and_validation():
    binary = l2_regularization("breast_cancer")
    assert binary.metadata["sizes"] == {"train": 284, "val": 142, "test": 143}
    assert binary.x0["log_l2"].shape == (30,) and binary.y0["W"].shape == (30,)
    digits = l2_regularization("digits", seed=1)
    assert digits.metadata["classes"] == 10
    assert digits.y0["W"].shape == (64, 10) and digits.y0["b"].shape == (10,)
    hg = bl.hypergrad(digits.problem, digits.x0, digits.y0, "cg")
    assert torch.isfinite(hg["log_l2"]).all()
    with pytest.raises(ValueError, match="fraction"):
        l2_regularization(train_fraction=0.8, val_fraction=0.3)


def test_cg_hypergradient_matches_finite_differences():
    task = l2_regularization("breast_cancer")
    x = {"log_l2": torch.linspace(-2.0, 1.0, 30, dtype=torch.float64)}
    y_star = inner_fit(task, x)
    method = bl.method("cg", inner_steps=0, solver_iters=200, solver_tol=1e-13)
    hg = bl.hypergrad(task.problem, x, y_star, method)["log_l2"]
    h = 1e-4
    for j in (0, 7, 29):
        plus, minus = x["log_l2"].clone(), x["log_l2"].clone()
        plus[j] += h
        minus[j] -= h
        values = [
            task.problem.upper(None, inner_fit(task, {"log_l2": z}), None) for z in (plus, minus)
        ]
        fd = (values[0] - values[1]) / (2 * h)
        assert float(hg[j]) == pytest.approx(float(fd), rel=1e-4, abs=1e-8)


@pytest.mark.parametrize("dataset", ["breast_cancer", "digits"])
def test_cg_lowers_validation_loss(dataset):
    task = l2_regularization(dataset)
    result = bl.solve(
        task.problem, task.x0, task.y0,
        bl.method("cg", **task.method_options("cg", inner_steps=20)),
        callbacks=task.callbacks, **{**task.solve_defaults, "steps": 15},
    )  # fmt: skip
    start = task.problem.upper(task.x0, gd_fit(task, task.x0), None)
    end = task.problem.upper(result.x, gd_fit(task, result.x), None)
    assert float(end) < 0.8 * float(start)
    chance = 1 / task.metadata["classes"]
    assert result.history[-1]["test_accuracy"] > chance + 0.5 * (1 - chance)
    assert result.history[-1]["test_loss"] < result.history[0]["test_loss"]


def test_deterministic_split():
    a, b = l2_regularization(seed=2), l2_regularization(seed=2)
    c = l2_regularization(seed=3)
    hg = [bl.hypergrad(t.problem, t.x0, t.y0, "cg")["log_l2"] for t in (a, b, c)]
    torch.testing.assert_close(hg[0], hg[1], rtol=0, atol=0)
    assert not torch.allclose(hg[0], hg[2])

"""krylov_synthetic: exact reference hypergradient, finite differences, callbacks, default size."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl
from bilevel.tasks.krylov_synthetic import krylov_synthetic


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def test_validates_and_hessian_is_closed_form():
    task = krylov_synthetic(n=50, kappa=100.0)
    hg = bl.hypergrad(task.problem, task.x0, task.y0, "cg")
    assert torch.isfinite(hg["x"]).all()
    data, x, y = task.metadata["data"], task.x0["x"], task.y0["y"]
    hessian = torch.func.hessian(lambda y_: data.lower({"x": x}, {"y": y_}))(y)
    torch.testing.assert_close(data.lower_hessian(x, y), hessian, rtol=1e-10, atol=1e-8)
    eig = torch.linalg.eigvalsh(hessian)
    assert eig[0] >= 1 - task.metadata["gamma"] - 1e-9
    assert eig[-1] <= task.metadata["lipschitz_estimate"]


def test_reference_matches_finite_differences():
    task = krylov_synthetic(n=10, kappa=100.0, seed=3)
    data, x = task.metadata["data"], task.x0
    reference = data.reference_hypergradient(x)["x"]
    h = 1e-5
    fd = torch.zeros_like(reference)
    for i in range(len(fd)):
        plus, minus = x["x"].clone(), x["x"].clone()
        plus[i] += h
        minus[i] -= h
        fd[i] = (data.value({"x": plus}) - data.value({"x": minus})) / (2 * h)
    assert relative_error(reference, fd) < 1e-7


def test_cg_with_long_inner_solve_matches_reference():
    task = krylov_synthetic(n=50, kappa=100.0)
    lr = task.method_defaults["inner_lr"]
    method = bl.method("cg", inner_steps=4000, inner_lr=lr, solver_iters=200, solver_tol=1e-13)
    hg = bl.hypergrad(task.problem, task.x0, task.y0, method)
    reference = task.metadata["data"].reference_hypergradient(task.x0)
    assert relative_error(hg["x"], reference["x"]) < 1e-6
    # and task defaults (5 inner steps of 1/L) are far from it: the benchmark's point
    rough = bl.hypergrad(
        task.problem, task.x0, task.y0, bl.method("cg", **task.method_options("cg"))
    )
    assert relative_error(rough["x"], reference["x"]) > 1e-3


def test_callbacks_reference_every():
    task = krylov_synthetic(n=20, kappa=10.0, reference_every=2)
    method = bl.method("cg", **task.method_options("cg", solver_iters=20))
    for _ in range(2):  # a second run with the same task restarts the count
        result = bl.solve(
            task.problem, task.x0, task.y0, method, steps=5, outer_optimizer="sgd",
            outer_lr=0.1, callbacks=task.callbacks,
        )  # fmt: skip
        with_reference = [row["step"] for row in result.history if "hypergrad_error" in row]
        assert with_reference == [1, 3, 5]
        assert all(row["upper_value"] == pytest.approx(row["upper_loss"]) for row in result.history)
        assert all(0 <= row["hypergrad_error"] < 1 for row in result.history if "grad_norm" in row)
    assert (
        "hypergrad_error"
        not in bl.solve(
            task.problem,
            task.x0,
            task.y0,
            method,
            steps=2,
            callbacks=krylov_synthetic(n=20).callbacks,
        ).history[-1]
    )


def test_deterministic_given_seed():
    a, b = krylov_synthetic(n=30, seed=5), krylov_synthetic(n=30, seed=5)
    torch.testing.assert_close(a.metadata["data"].G, b.metadata["data"].G, rtol=0, atol=0)
    torch.testing.assert_close(a.x0["x"], b.x0["x"], rtol=0, atol=0)
    assert not torch.equal(a.x0["x"], krylov_synthetic(n=30, seed=6).x0["x"])


@pytest.mark.slow
def test_default_size_builds():
    task = krylov_synthetic()
    assert task.metadata["data"].G.shape == (2000, 2000)
    assert task.metadata["lipschitz_estimate"] > 1e5

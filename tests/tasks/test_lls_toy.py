"""lls_toy: closed forms of the non-singleton toy problem and the LLS failure (x → 0.5)."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl
from bilevel.tasks.lls_toy import lls_toy


def test_inner_solution_moves_y1_only():
    task = lls_toy(dim=3)
    x = {"x": torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)}
    y0 = {
        "y1": torch.zeros(3, dtype=torch.float64),
        "y2": torch.full((3,), 0.7, dtype=torch.float64),
    }
    method = bl.method("fixed_point", inner_steps=60, inner_lr=0.5)
    _, state = method.step(task.problem, x, method.init(task.problem, x, y0))
    # y*(x) = (x, y2 unchanged): g ignores y2
    torch.testing.assert_close(state.y["y1"], x["x"], rtol=0, atol=1e-12)
    torch.testing.assert_close(state.y["y2"], y0["y2"], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["itd", "forward", "neumann", "fixed_point"])
def test_hypergradient_is_the_lls_value(method):
    # with y2 fixed at 0 and y1 = x: F(x) = ½x² + ½(x − 1)², so ∇F(x) = 2x − 1
    task = lls_toy(dim=1)
    x = {"x": torch.tensor([0.3], dtype=torch.float64)}
    options = task.method_options(method, inner_steps=60)
    if method in ("neumann", "fixed_point"):
        options["solver_iters"] = 60  # error (1 − solver_lr)^J
    hg = bl.hypergrad(task.problem, x, task.y0, bl.method(method, **options))
    torch.testing.assert_close(hg["x"], 2 * x["x"] - 1, rtol=0, atol=1e-10)


@pytest.mark.parametrize(("method", "dim"), [("itd", 1), ("fixed_point", 1), ("itd", 100)])
def test_lls_methods_converge_to_one_half(method, dim):
    task = lls_toy(dim=dim)
    solve = {**task.solve_defaults, "steps": 30}
    result = bl.solve(
        task.problem,
        task.x0,
        task.y0,
        bl.method(method, **task.method_options(method)),
        callbacks=task.callbacks,
        **solve,
    )
    assert torch.all((result.x["x"] - 0.5).abs() < 0.01)
    last = result.history[-1]
    assert last["distance"] == pytest.approx(task.metadata["lls_distance"], abs=0.01)
    assert last["upper_value"] == pytest.approx(task.metadata["lls_upper_value"], rel=0.01)
    assert last["upper_value"] == pytest.approx(last["upper_loss"])


def test_cg_is_finite_but_not_the_lls_answer():
    """∇²_yy g = diag(I, 0) is singular and ∇_y f has a component in its null space: CG (an
    LLS method) takes no step along zero-curvature directions, so it stays finite, but its
    first step already mixes the null-space part of ∇_y f into v: the estimate is not 2x − 1."""
    task = lls_toy(dim=1)
    x = {"x": torch.tensor([0.3], dtype=torch.float64)}
    hg = bl.hypergrad(task.problem, x, task.y0, bl.method("cg", **task.method_options("cg")))
    assert torch.isfinite(hg["x"]).all()
    assert abs(float(hg["x"]) - (2 * 0.3 - 1)) > 0.1


def test_metadata_and_validation():
    task = lls_toy(dim=4)
    torch.testing.assert_close(task.metadata["x_star"], torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(
        task.metadata["lls_limit"], torch.full((4,), 0.5, dtype=torch.float64)
    )
    assert task.metadata["lls_upper_value"] == 1.0
    assert task.x0["x"].shape == (4,) and task.y0.keys() == {"y1", "y2"}
    assert task.solve_defaults == {"steps": 2000, "outer_optimizer": "sgd", "outer_lr": 0.5}
    with pytest.raises(ValueError, match="dim"):
        lls_toy(dim=0)


def test_method_specific_defaults_reach_only_that_method():
    """``mu`` is BDA's aggregation weight here; other methods never see it."""
    task = lls_toy(dim=1)
    assert task.method_options("itd") == {"inner_lr": 0.5, "inner_steps": 16, "warm_start": False}
    assert "mu" not in task.method_options("cg")

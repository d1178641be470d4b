"""hyper_representation: shapes, closed-form ridge head, and that cg lowers the validation loss."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl
from bilevel.tasks.hyper_representation import hyper_representation

SMALL = {"linear": {"p": 8, "d": 12, "n": 60}, "deep": {"p": 10, "hidden": 16, "d": 8, "n": 80}}


def test_shapes_and_paper_defaults():
    linear = hyper_representation("linear", **SMALL["linear"])
    assert linear.x0["H"].shape == (8, 12) and linear.y0["w"].shape == (12,)
    deep = hyper_representation("deep", **SMALL["deep"])
    assert {k: tuple(v.shape) for k, v in deep.x0.items()} == {
        "0.weight": (16, 10), "0.bias": (16,), "2.weight": (8, 16), "2.bias": (8,),
    }  # fmt: skip
    assert deep.y0["w"].shape == (8,)
    assert deep.metadata["model"](torch.zeros(3, 10, dtype=torch.float64)).shape == (3, 8)
    assert linear.method_defaults["inner_steps"] == 20 and deep.method_defaults["inner_steps"] == 10
    assert linear.solve_defaults["outer_lr"] == 0.05 and deep.solve_defaults["outer_lr"] == 0.01
    with pytest.raises(ValueError, match="kind"):
        hyper_representation("conv")


@pytest.mark.parametrize("kind", ["linear", "deep"])
def test_validates_and_cg_matches_closed_form(kind):
    # the inner problem is ridge regression on the features: w* = (ΦᵀΦ/n + reg I)⁻¹ Φᵀt/n, and
    # ∇F = ∂/∂x f(x, w*(x)) by autograd through that closed form
    task = hyper_representation(kind, **SMALL[kind])
    assert torch.isfinite(
        bl.hypergrad(task.problem, task.x0, task.y0, "cg")["H" if kind == "linear" else "0.weight"]
    ).all()
    inputs, targets = task.metadata["splits"]["train"]
    reg = task.metadata["reg"]

    def value(x):
        phi = task.metadata["features"](x, inputs)
        n, d = phi.shape
        gram = phi.T @ phi / n + reg * torch.eye(d, dtype=phi.dtype)
        w = torch.linalg.solve(gram, phi.T @ targets / n)
        z = task.problem.representations["upper"](x, None)  # the loss sees the features
        return task.problem.upper(z, {"w": w}, None)

    x = {k: v.clone().requires_grad_(True) for k, v in task.x0.items()}
    exact = dict(zip(x, torch.autograd.grad(value(x), list(x.values())), strict=True))
    method = bl.method("cg", inner_steps=3000, inner_lr=0.5, solver_iters=200, solver_tol=1e-13)
    hg = bl.hypergrad(task.problem, task.x0, task.y0, method)
    for k in exact:
        torch.testing.assert_close(hg[k], exact[k], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind", ["linear", "deep"])
def test_cg_lowers_validation_loss(kind):
    task = hyper_representation(kind, **SMALL[kind])
    result = bl.solve(
        task.problem, task.x0, task.y0, bl.method("cg", **task.method_options("cg")),
        callbacks=task.callbacks, **{**task.solve_defaults, "steps": 30},
    )  # fmt: skip
    first, last = result.history[0], result.history[-1]
    assert last["val_loss"] < 0.5 * first["val_loss"]
    assert last["test_loss"] < first["test_loss"]
    assert last["val_loss"] == pytest.approx(last["upper_loss"])


def test_deterministic_given_seed():
    a = hyper_representation("deep", **SMALL["deep"], seed=4)
    b = hyper_representation("deep", **SMALL["deep"], seed=4)
    for k in a.x0:
        torch.testing.assert_close(a.x0[k], b.x0[k], rtol=0, atol=0)
    ya, yb = a.metadata["splits"]["test"][1], b.metadata["splits"]["test"][1]
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)


def test_paper_scale_is_the_authors_notebooks():
    """N(0,1) data and weights; deep form without biases, reg 0.001; per-method outer lrs."""
    lin = bl.tasks.make("hyper_representation", kind="linear", scale="paper")
    inputs, _ = lin.metadata["splits"]["train"]
    assert abs(float(inputs.std()) - 1) < 0.05 and abs(float(lin.x0["H"].std()) - 1) < 0.05
    assert lin.metadata["reg"] == 0.1 and lin.metadata["paper_outer_lr"]["hozog"] == 0.1
    deep = bl.tasks.make("hyper_representation", kind="deep", scale="paper", n=50)
    assert sorted(deep.x0) == ["0.weight", "2.weight"] and deep.metadata["reg"] == 0.001
    assert abs(float(deep.x0["0.weight"].std()) - 1) < 0.05
    normalized = bl.tasks.make("hyper_representation", kind="linear")
    assert normalized.metadata["scale"] == "normalized"
    assert float(normalized.x0["H"].std()) < 0.2  # divided by √p
    with pytest.raises(ValueError, match="scale"):
        bl.tasks.make("hyper_representation", scale="authors")

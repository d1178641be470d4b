"""Every baseline method against the closed-form hypergradient of random quadratics."""

import pytest
import torch

import bilevel as bl
from bilevel.tasks import quadratic

from helpers import relative_error, strictly_decreasing

# (dim_x, dim_y, condition, seed): different sizes and conditioning
INSTANCES = [(3, 6, 5.0, 0), (5, 10, 20.0, 1), (8, 16, 50.0, 2)]


def _steps_for(condition: float) -> int:
    """Inner GD steps with lr 1 so that (1 - 1/condition)^K < 1e-11."""
    return int(condition * 26) + 20


def _converged_options(name: str, condition: float) -> dict:
    k = _steps_for(condition)
    common = {"inner_steps": k, "inner_lr": 1.0}
    return {
        "itd": common,
        "forward": common,
        "cg": {**common, "solver_iters": 200, "solver_tol": 1e-14},
        "neumann": {**common, "solver_iters": k, "solver_lr": 1.0},
        "fixed_point": {**common, "solver_iters": k, "solver_lr": 1.0},
    }[name]


@pytest.mark.parametrize("instance", INSTANCES, ids=lambda i: f"dx{i[0]}-dy{i[1]}-k{i[2]:g}")
@pytest.mark.parametrize("name", ["itd", "forward", "cg", "neumann", "fixed_point"])
def test_exact_hypergradient_at_convergence(name, instance):
    dim_x, dim_y, condition, seed = instance
    task = quadratic(dim_x=dim_x, dim_y=dim_y, condition=condition, seed=seed)
    exact = task.metadata["data"].hypergradient(task.x0)
    hg = bl.hypergrad(
        task.problem, task.x0, task.y0, bl.method(name, **_converged_options(name, condition))
    )
    assert hg["x"].dtype == torch.float64
    assert relative_error(hg, exact) < 1e-6


def _errors(name: str, key: str, values: list[int], base: dict) -> list[float]:
    task = quadratic(dim_x=4, dim_y=12, condition=30.0, seed=3)
    exact = task.metadata["data"].hypergradient(task.x0)
    out = []
    for v in values:
        hg = bl.hypergrad(task.problem, task.x0, task.y0, bl.method(name, **base, **{key: v}))
        out.append(relative_error(hg, exact))
    return out


@pytest.mark.parametrize("name", ["itd", "forward"])
def test_unrolled_error_decreases_with_inner_steps(name):
    errors = _errors(name, "inner_steps", [5, 20, 80, 320], {"inner_lr": 1.0})
    assert strictly_decreasing(errors), errors
    assert errors[-1] < 1e-3


@pytest.mark.parametrize(
    ("name", "base"),
    [
        ("cg", {"solver_tol": 0.0, "warm_start": False}),
        ("neumann", {"solver_lr": 1.0}),
        ("fixed_point", {"solver_lr": 1.0, "warm_start": False}),
    ],
)
def test_implicit_error_decreases_with_solver_iterations(name, base):
    opts = {"inner_steps": 900, "inner_lr": 1.0, **base}
    # CG minimises the A-norm error of v, not the hypergradient error, which is therefore only
    # eventually monotone in J: compare from J = 6 on (dim_y = 12, exact at J = 12).
    iters = [6, 8, 12] if name == "cg" else [5, 20, 80, 320]
    errors = _errors(name, "solver_iters", iters, opts)
    assert strictly_decreasing(errors), errors


def test_truncated_itd_error_decreases_with_truncation_length():
    # the bound on the truncation error decays geometrically in k; very short truncations
    # (k of a few steps) are not ordered, so start at k = 20
    lengths = [20, 40, 80, 160, 320]
    errors = _errors("itd", "truncate", lengths, {"inner_steps": 900, "inner_lr": 1.0})
    assert strictly_decreasing(errors), errors
    assert errors[-1] < 1e-4


def test_warm_started_aid_improves_over_steps_at_fixed_x():
    """hypergrad(steps=n): warm-started y and v accumulate, so the estimate improves."""
    task = quadratic(dim_x=4, dim_y=12, condition=30.0, seed=4)
    exact = task.metadata["data"].hypergradient(task.x0)
    m = bl.method("cg", inner_steps=20, inner_lr=1.0, solver_iters=3, solver_tol=0.0)
    errors = [
        relative_error(bl.hypergrad(task.problem, task.x0, task.y0, m, steps=s), exact)
        for s in (1, 5, 40)
    ]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-6


def test_itd_and_forward_agree_for_every_k():
    task = quadratic(dim_x=3, dim_y=7, condition=10.0, seed=5)
    for k in (1, 7, 25):
        a = bl.hypergrad(task.problem, task.x0, task.y0, bl.method("itd", inner_steps=k))
        b = bl.hypergrad(task.problem, task.x0, task.y0, bl.method("forward", inner_steps=k))
        c = bl.hypergrad(
            task.problem, task.x0, task.y0, bl.method("forward", inner_steps=k, batched=False)
        )
        assert relative_error(a, b) < 1e-12 and relative_error(b, c) < 1e-12


@pytest.mark.parametrize("optimizer", ["momentum", "adam", "nesterov"])
def test_unrolled_methods_agree_with_other_inner_optimizers(optimizer):
    task = quadratic(dim_x=3, dim_y=7, condition=10.0, seed=6)
    opts = {"inner_steps": 15, "inner_lr": 0.3, "inner_optimizer": optimizer}
    a = bl.hypergrad(task.problem, task.x0, task.y0, bl.method("itd", **opts))
    b = bl.hypergrad(task.problem, task.x0, task.y0, bl.method("forward", **opts))
    assert relative_error(a, b) < 1e-10
    plain = bl.hypergrad(
        task.problem, task.x0, task.y0, bl.method("itd", inner_steps=15, inner_lr=0.3)
    )
    assert relative_error(a, plain) > 1e-3  # the optimizer is really used


def test_momentum_inner_loop_reaches_exact_hypergradient():
    task = quadratic(dim_x=3, dim_y=7, condition=20.0, seed=7)
    exact = task.metadata["data"].hypergradient(task.x0)
    m = bl.method("cg", inner_steps=300, inner_lr=0.5, inner_optimizer="momentum", solver_iters=50)
    assert relative_error(bl.hypergrad(task.problem, task.x0, task.y0, m), exact) < 1e-6

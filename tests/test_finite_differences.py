"""Unrolled methods against central finite differences of F_K(x) = f(x, y_K(x)) on
non-quadratic problems, and implicit methods against each other."""

import pytest

import bilevel as bl

from helpers import (
    finite_difference,
    logistic_l2_problem,
    mlp_problem,
    relative_error,
    unrolled_value,
)

CASES = {
    "logistic": (logistic_l2_problem, 30, 0.5),
    "mlp": (mlp_problem, 20, 0.3),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", ["itd", "forward"])
def test_unrolled_matches_finite_differences(name, case):
    make, steps, lr = CASES[case]
    problem, x, y = make()
    hg = bl.hypergrad(
        problem, x, y, bl.method(name, inner_steps=steps, inner_lr=lr, warm_start=False)
    )
    fd = finite_difference(lambda x_: unrolled_value(problem, x_, y, steps, lr), x)
    assert relative_error(hg, fd) < 1e-6


@pytest.mark.parametrize("case", sorted(CASES))
def test_itd_equals_forward(case):
    make, steps, lr = CASES[case]
    problem, x, y = make()
    a = bl.hypergrad(problem, x, y, bl.method("itd", inner_steps=steps, inner_lr=lr))
    b = bl.hypergrad(problem, x, y, bl.method("forward", inner_steps=steps, inner_lr=lr))
    assert relative_error(a, b) < 1e-10


def test_implicit_methods_agree_at_convergence_on_logistic():
    problem, x, y = logistic_l2_problem()
    # lower Hessian eigenvalues lie in [exp(-1), ~0.9]: lr 1 contracts by ~0.63 per step
    base = {"inner_steps": 120, "inner_lr": 1.0}
    cg = bl.hypergrad(problem, x, y, bl.method("cg", **base, solver_iters=100, solver_tol=1e-14))
    ns = bl.hypergrad(problem, x, y, bl.method("neumann", **base, solver_iters=120, solver_lr=1.0))
    fp = bl.hypergrad(
        problem, x, y, bl.method("fixed_point", **base, solver_iters=120, solver_lr=1.0)
    )
    assert relative_error(ns, cg) < 1e-6
    assert relative_error(fp, cg) < 1e-6
    # and they agree with finite differences of the converged unrolled objective
    fd = finite_difference(lambda x_: unrolled_value(problem, x_, y, 120, 1.0), x, h=1e-4)
    assert relative_error(cg, fd) < 1e-6

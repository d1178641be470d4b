"""Oracle counts are exact: what each method's docstring promises."""

import pytest

import bilevel as bl
from bilevel.methods.implicit import POWER_ITERS
from bilevel.tasks import quadratic


def _counts(name: str, steps: int = 1, **options) -> dict:
    task = quadratic(dim_x=3, dim_y=6, seed=0)
    bl.hypergrad(task.problem, task.x0, task.y0, bl.method(name, **options), steps=steps)
    return dict(task.problem.counts)


def test_cg_counts_first_and_warm_started_steps():
    k, j = 7, 4
    assert _counts("cg", inner_steps=k, solver_iters=j, solver_tol=0.0) == {
        "lower_grad": k,
        "upper_grad": 1,
        "linearize": 1,  # ∇_y g's graph at y_K, shared by the J HVPs and the mixed product
        "hvp": j,
        "mixed": 1,
    }
    # from the second step on, the warm-started v costs one extra HVP for its residual
    assert _counts("cg", steps=3, inner_steps=k, solver_iters=j, solver_tol=0.0) == {
        "lower_grad": 3 * k,
        "upper_grad": 3,
        "linearize": 3,
        "hvp": j + 2 * (j + 1),
        "mixed": 3,
    }


def test_neumann_and_fixed_point_counts():
    # solver_iters counts HVPs for every method: J = 6 products, a series of 7 terms; the
    # first step's step-size check: POWER_ITERS power iterations (counted HVPs)
    assert _counts("neumann", inner_steps=5, solver_iters=6) == {
        "lower_grad": 5,
        "upper_grad": 1,
        "linearize": 1,
        "hvp": 6 + POWER_ITERS,
        "mixed": 1,
    }
    assert _counts("fixed_point", steps=2, inner_steps=5, solver_iters=6) == {
        "lower_grad": 10,
        "upper_grad": 2,
        "linearize": 2,
        "hvp": 12 + POWER_ITERS,
        "mixed": 2,
    }


@pytest.mark.parametrize(("truncate", "k"), [(None, 9), (4, 4), (20, 9)])
def test_itd_counts(truncate, k):
    assert _counts("itd", inner_steps=9, truncate=truncate) == {
        "lower_grad": 9,
        "upper_grad": 1,
        "hvp": k,
        "mixed": k,
    }


def test_forward_counts():
    assert _counts("forward", inner_steps=6) == {"lower_grad": 6, "jvp": 18, "upper_grad": 1}


def test_solve_history_reports_cumulative_counts_of_its_own_run():
    task = quadratic(dim_x=3, dim_y=6, seed=0)
    bl.hypergrad(task.problem, task.x0, task.y0, "cg")  # earlier use of the same problem
    result = bl.solve(
        task.problem,
        task.x0,
        task.y0,
        bl.method("cg", inner_steps=2, solver_iters=3, solver_tol=0.0),
        steps=4,
    )
    assert [row["oracles"]["lower_grad"] for row in result.history] == [2, 4, 6, 8]
    assert result.history[-1]["oracles"] == {
        "lower_grad": 8,
        "upper_grad": 4,
        "linearize": 4,
        "hvp": 3 + 3 * 4,
        "mixed": 4,
    }


def test_an_aid_step_reduces_only_what_it_uses():
    # under data sharding every reduction is an all-reduce: the linearisation's own ∇_y g, which
    # AID never reads, is not reduced (it is built on first use)
    task = quadratic(dim_x=3, dim_y=6, seed=0)
    reduced = []
    task.problem.reduce = lambda tree: reduced.append(tree) or tree
    k, j = 4, 3
    method = bl.method("cg", inner_steps=k, solver_iters=j, solver_tol=0.0)
    bl.hypergrad(task.problem, task.x0, task.y0, method, steps=1)
    assert len(reduced) == k + 2 + j + 1  # inner gradients, ∇_x f and ∇_y f, HVPs, mixed

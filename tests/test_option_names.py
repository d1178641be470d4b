"""One meaning per option name: renamed options name their new name, task defaults reach only
the methods that take them."""

import pytest
import torch

import bilevel as bl
from bilevel.tasks import Task
from bilevel.tasks.base import solver_defaults


@pytest.mark.parametrize(
    ("name", "old", "new"),
    [("esj", "mu", "radius"), ("esj_s", "mu", "radius"), ("hozog", "mu", "radius"),
     ("lancbio", "solver_lr", "fallback_lr"), ("bda", "s_l", "inner_lr"),
     ("sgld", "step_size", "inner_lr")],  # fmt: skip
)
def test_an_old_name_is_rejected_naming_the_new_one(name, old, new):
    message = f"'{old}' is now '{new}'"
    with pytest.raises(TypeError, match=message):
        bl.method(name, **{old: 0.1})
    with pytest.raises(TypeError, match=message):  # the class itself, too
        bl.methods.method_class(name)(**{old: 0.1})
    assert new in bl.methods.method_class(name).option_names()


def test_bda_keeps_mu_and_amigo_rejects_the_other_solvers_option():
    assert bl.method("bda", mu=0.3).mu == 0.3
    with pytest.raises(ValueError, match="solver='cg' has no solver_lr"):
        bl.method("amigo", solver_lr=0.1)
    assert bl.method("amigo", solver="gd", solver_lr=0.2).solver_lr == 0.2


def test_neumann_solver_iters_counts_hvps_like_cg():
    from bilevel.methods.implicit import POWER_ITERS
    from bilevel.tasks import quadratic

    for name in ("cg", "neumann", "fixed_point"):
        task = quadratic(dim_x=2, dim_y=4)
        exact_count = {"solver_tol": 0.0} if name == "cg" else {}  # no early stop
        method = bl.method(name, inner_steps=0, solver_iters=7, **exact_count)
        bl.hypergrad(task.problem, task.x0, task.y0, method)
        check = 0 if name == "cg" else POWER_ITERS  # neumann's and fixed point's step check
        assert task.problem.counts["hvp"] == 7 + check, name


def _task(defaults):
    zero = {"x": torch.zeros(1, dtype=torch.float64)}
    problem = bl.Problem(upper=lambda x, y, b: (y["x"] ** 2).sum(),
                         lower=lambda x, y, b: ((y["x"] - x["x"]) ** 2).sum())  # fmt: skip
    return Task(name="t", problem=problem, x0=zero, y0=dict(zero), method_defaults=defaults)


def test_task_defaults_are_shared_or_per_method():
    task = _task({"inner_steps": 4, **solver_defaults(solver_iters=3, solver_lr=0.2),
                  "esj": {"radius": 0.1}})  # fmt: skip
    assert task.method_options("cg") == {"inner_steps": 4, "solver_iters": 3}
    assert task.method_options("neumann") == {"inner_steps": 4, "solver_iters": 3,
                                              "solver_lr": 0.2}  # fmt: skip
    assert task.method_options("lancbio") == {"inner_steps": 4}
    assert task.method_options("esj") == {"inner_steps": 4, "radius": 0.1}
    assert "inner_optimizer" not in task.method_options("sgld", inner_steps=2)
    with pytest.raises(ValueError, match="'solver_lr' is not an option every method shares"):
        _task({"solver_lr": 0.1})
    with pytest.raises(TypeError, match="has no option"):
        _task({"lancbio": {"solver_iters": 3}})
    with pytest.raises(TypeError, match="'mu' is now 'radius'"):
        _task({"esj": {"mu": 0.1}})

"""Bad input gets a clear error naming the problem."""

import pytest
import torch

import bilevel as bl
from bilevel.tasks import quadratic


def _vec(n=3):
    return torch.zeros(n, dtype=torch.float64)


def _problem(lower=None, upper=None, **kwargs):
    return bl.Problem(
        upper=upper or (lambda x, y, b: torch.sum((y["y"] - 1) ** 2) + torch.sum(x["x"] ** 2)),
        lower=lower or (lambda x, y, b: torch.sum((y["y"] - x["x"]) ** 2)),
        **kwargs,
    )


def test_non_scalar_loss():
    problem = _problem(lower=lambda x, y, b: (y["y"] - x["x"]) ** 2)
    with pytest.raises(ValueError, match=r"lower loss must return a scalar.*shape \(3,\)"):
        bl.hypergrad(problem, {"x": _vec()}, {"y": _vec()}, "cg")


def test_loss_not_a_tensor():
    problem = _problem(upper=lambda x, y, b: 1.0)
    with pytest.raises(TypeError, match="upper loss must return a torch.Tensor"):
        bl.hypergrad(problem, {"x": _vec()}, {"y": _vec()}, "cg")


@pytest.mark.parametrize(
    ("x", "y", "error", "match"),
    [
        (_vec(), {"y": _vec()}, TypeError, "x must be a dict"),
        ({"x": _vec()}, {"y": torch.zeros(3, dtype=torch.int64)}, TypeError, "floating"),
        ({"x": _vec()}, {"y": [0.0, 0.0, 0.0]}, TypeError, r"y\['y'\] must be a torch.Tensor"),
        ({}, {"y": _vec()}, ValueError, "x is an empty tree"),
    ],
)
def test_variables_must_be_trees_of_floating_tensors(x, y, error, match):
    with pytest.raises(error, match=match):
        bl.hypergrad(_problem(), x, y, "cg")


def test_lower_loss_independent_of_y():
    problem = _problem(lower=lambda x, y, b: torch.sum(x["x"] ** 2))
    with pytest.raises(ValueError, match="does not depend on any inner variable"):
        bl.hypergrad(problem, {"x": _vec()}, {"y": _vec()}, "cg")


def test_lower_loss_independent_of_part_of_y_is_legal():
    problem = bl.Problem(
        upper=lambda x, y, b: torch.sum((y["a"] - 1) ** 2) + torch.sum((y["b"] - x["x"]) ** 2),
        lower=lambda x, y, b: torch.sum((y["a"] - x["x"]) ** 2),
    )
    hg = bl.hypergrad(problem, {"x": _vec()}, {"a": _vec(), "b": _vec()}, "itd")
    assert torch.isfinite(hg["x"]).all()


def test_nan_from_an_oracle_names_oracle_and_step():
    # sqrt of a quantity that the inner loop drives negative: NaN gradients after a few steps
    problem = _problem(
        lower=lambda x, y, b: torch.sum(torch.sqrt(y["y"])) + torch.sum(x["x"] * y["y"])
    )
    x, y = (
        {"x": torch.full((3,), 5.0, dtype=torch.float64)},
        {"y": torch.ones(3, dtype=torch.float64)},
    )
    with pytest.raises(bl.NonFiniteError, match=r"lower_grad.*outer step 0"):
        bl.hypergrad(problem, x, y, bl.method("cg", inner_steps=5, inner_lr=0.5))


def test_nan_at_start_is_reported():
    problem = _problem(upper=lambda x, y, b: torch.sum(y["y"]) * float("nan"))
    with pytest.raises(bl.NonFiniteError, match="upper loss is nan"):
        bl.hypergrad(problem, {"x": _vec()}, {"y": _vec()}, "cg")


def test_divergent_inner_loop_in_solve_is_reported():
    task = quadratic(dim_x=2, dim_y=4, seed=0)
    with pytest.raises(bl.NonFiniteError, match="lower_grad"):
        bl.solve(
            task.problem, task.x0, task.y0, bl.method("cg", inner_steps=2000, inner_lr=3.0), steps=3
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_a_nan_watched_long_before_the_check_is_still_named_and_memory_stays_flat(dtype):
    # a loop of one's own may step a method many times between checks: the watch keeps one
    # running total per name, not every output
    problem = _problem()
    finite = {"y": torch.ones(4, dtype=dtype)}
    for _ in range(300):
        problem.watch("lower_grad", finite)
    problem.watch("upper_grad", {"x": torch.tensor([1.0, float("nan")], dtype=dtype)})
    for _ in range(300):
        problem.watch("upper_grad", finite)
        problem.watch_solve(torch.tensor(False), torch.tensor(2.0, dtype=dtype))
    assert all(len(kept) == 2 for kept in problem._nonfinite.values())
    with pytest.raises(bl.NonFiniteError, match=r"oracle\(s\) upper_grad produced NaN/Inf "
                                                 r"at outer step 7"):  # fmt: skip
        problem.raise_if_nonfinite(7)
    problem.raise_if_nonfinite(8)  # the check starts afresh


def test_a_true_bool_flag_among_finite_ones_names_the_linear_solve():
    problem = _problem()
    problem.watch_solve(torch.tensor(2.0), torch.tensor(False))
    problem.watch_solve(torch.tensor(True), torch.tensor(3.0))
    problem.watch_solve(torch.tensor(False))
    with pytest.raises(bl.NonFiniteError, match="linear solve .* broke down at outer step 2"):
        problem.raise_if_nonfinite(2)


def test_unknown_method_lists_available():
    with pytest.raises(ValueError, match=r"unknown method 'nope'; available: .*cg.*itd"):
        bl.method("nope")


def test_unknown_option_lists_options():
    with pytest.raises(TypeError, match=r"no option\(s\) solver_itres.*solver_iters"):
        bl.method("cg", solver_itres=3)


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("cg", {"inner_steps": -1}, "inner_steps"),
        ("cg", {"inner_lr": 0.0}, "inner_lr"),
        ("cg", {"inner_optimizer": "lbfgs"}, "unknown inner_optimizer"),
        ("neumann", {"solver_lr": -1.0}, "solver_lr"),
        ("itd", {"truncate": 1.5}, "truncate"),
    ],
)
def test_bad_option_values(name, options, match):
    with pytest.raises(ValueError, match=match):
        bl.method(name, **options)


def test_init_lower_shape_mismatch():
    problem = _problem(init_lower=lambda x: {"y": torch.zeros(4, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"init_lower\(x\)\['y'\] has shape \(4,\).*\(3,\)"):
        bl.hypergrad(problem, {"x": _vec()}, {"y": _vec()}, "cg")


def test_solve_arguments():
    task = quadratic(dim_x=2, dim_y=4, seed=0)
    with pytest.raises(ValueError, match="unknown outer_optimizer"):
        bl.solve(task.problem, task.x0, task.y0, "cg", steps=1, outer_optimizer="rmsprop")
    with pytest.raises(ValueError, match="steps must be"):
        bl.solve(task.problem, task.x0, task.y0, "cg", steps=-1)
    with pytest.raises(ValueError, match="steps must be"):
        bl.hypergrad(task.problem, task.x0, task.y0, "cg", steps=0)
    with pytest.raises(TypeError, match="method must be"):
        bl.hypergrad(task.problem, task.x0, task.y0, 3)


def test_problem_requires_callables():
    with pytest.raises(TypeError, match="upper must be callable"):
        bl.Problem(upper=None, lower=lambda x, y, b: 0)


def test_batchnorm_in_training_mode_is_refused_by_functional():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="BatchNorm.*module.eval"):
        bl.functional(model)
    model.eval()
    apply = bl.functional(model)
    out = apply(bl.params(model), torch.randn(4, 2))
    assert out.shape == (4, 3)

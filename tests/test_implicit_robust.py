"""Implicit hypergradients that stay right away from convexity: the ridge-damped system, CG's
curvature guards, the x-free lower loss error and the iMAML preset."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import bilevel as bl
from bilevel.linalg import conjugate_gradient, fixed_point, neumann
from bilevel.tasks import make

from helpers import relative_error


def _quadratic(seed: int = 0, n: int = 6, m: int = 4):
    """g = ½yᵀAy − yᵀBx, f = ½‖y − c‖² + ½‖x‖² with A SPD: y* = A⁻¹Bx in closed form."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, n, generator=gen, dtype=torch.float64)
    a = q @ q.T / n + 0.5 * torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, m, generator=gen, dtype=torch.float64)
    c = torch.randn(n, generator=gen, dtype=torch.float64)
    x = {"x": torch.randn(m, generator=gen, dtype=torch.float64)}
    problem = bl.Problem(
        upper=lambda x, y, _: 0.5 * torch.sum((y["y"] - c) ** 2) + 0.5 * torch.sum(x["x"] ** 2),
        lower=lambda x, y, _: 0.5 * y["y"] @ a @ y["y"] - y["y"] @ b @ x["x"],
    )
    y_star = {"y": torch.linalg.solve(a, b @ x["x"])}
    return problem, x, y_star, a, b, c


def _diagonal_problem(negative: float):
    """g = ½ Σ dᵢyᵢ² − yᵀx with d = (2, 1, ``negative``, 0.3), f = ½‖y − c‖² (c = 1), at
    x = y = 0: b = ∇_y f = −c; the one negative eigenvalue makes ∇²_yy g indefinite."""
    diag = torch.tensor([2.0, 1.0, negative, 0.3], dtype=torch.float64)
    c = torch.ones(4, dtype=torch.float64)
    problem = bl.Problem(
        upper=lambda x, y, _: 0.5 * torch.sum((y["y"] - c) ** 2),
        lower=lambda x, y, _: 0.5 * torch.sum(diag * y["y"] ** 2) - y["y"] @ x["x"],
    )
    x, y0 = {"x": torch.zeros(4, dtype=torch.float64)}, {"y": torch.zeros(4, dtype=torch.float64)}
    return problem, x, y0, c


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("cg", {"solver_iters": 6, "solver_tol": 0.0}),
        ("neumann", {"solver_iters": 3000, "solver_lr": 0.2}),
        ("fixed_point", {"solver_iters": 3000, "solver_lr": 0.2}),
        ("amigo", {"solver_iters": 6, "solver_tol": 0.0}),
    ],
)
@pytest.mark.parametrize("ridge", [0.0, 0.3])
def test_ridge_matches_the_damped_closed_form(name, options, ridge):
    problem, x, y_star, a, b, c = _quadratic()
    method = bl.method(name, inner_steps=0, ridge=ridge, **options)
    hg = bl.hypergrad(problem, x, y_star, method)
    damped = a + ridge * torch.eye(len(a), dtype=a.dtype)
    exact = x["x"] + b.T @ torch.linalg.solve(damped, y_star["y"] - c)
    assert relative_error(hg, {"x": exact}) < 1e-10


def test_warm_started_neumann_is_fixed_point_iteration_from_the_last_v():
    problem, x, y_star, a, b, c = _quadratic()
    rhs = {"y": y_star["y"] - c}  # ∇_y f
    matvec = lambda v: {"y": a @ v["y"]}  # noqa: E731
    method = bl.method("neumann", inner_steps=0, solver_iters=3, solver_lr=0.2,
                       solver_warm_start=True)  # fmt: skip
    state = method.init(problem, x, y_star)
    _, state = method.step(problem, x, state)  # the first step: the series from scratch
    cold, _ = neumann(matvec, rhs, 0.2, 4)
    assert relative_error(state.v, cold) < 1e-14
    for _ in range(3):
        expected, _ = fixed_point(matvec, rhs, state.v, 0.2, 3)
        _, state = method.step(problem, x, state)
        assert relative_error(state.v, expected) < 1e-14


def test_warm_started_neumann_resolves_the_small_curvature_a_cold_series_cuts_short():
    # J = 2 terms from scratch leave the directions of small eigenvalues ~ηJλ short; carried
    # across outer steps at a fixed x the warm series converges to the exact hypergradient
    problem, x, y_star, a, b, c = _quadratic()
    exact = {"x": x["x"] + b.T @ torch.linalg.solve(a, y_star["y"] - c)}
    errors = {}
    for warm in (False, True):
        method = bl.method("neumann", inner_steps=0, solver_iters=2, solver_lr=0.2,
                           solver_warm_start=warm)  # fmt: skip
        state = method.init(problem, x, y_star)
        for _ in range(300):
            hg, state = method.step(problem, x, state)
        errors[warm] = relative_error(hg, exact)
    assert errors[False] > 0.05 and errors[True] < 1e-10


def test_warm_started_neumann_needs_a_product():
    with pytest.raises(ValueError, match="solver_warm_start needs solver_iters >= 1"):
        bl.method("neumann", solver_iters=0, solver_warm_start=True)


@pytest.mark.parametrize(
    "name, options", [("cg", {}), ("fixed_point", {}), ("amigo", {}), ("amigo", {"solver": "gd"})]
)
def test_solvers_whose_v_starts_at_zero_refuse_zero_iterations(name, options):
    # no iteration would leave v = 0 and the hypergradient ∇_x f without a word
    with pytest.raises(ValueError, match="solver_iters must be an integer >= 1"):
        bl.method(name, solver_iters=0, **options)
    bl.method("neumann", solver_iters=0)  # one term: v = η ∇_y f, a real (crude) solve


@pytest.mark.parametrize("host", [False, True])
def test_cg_restarts_on_negative_curvature_and_stays_bounded(host):
    diag = torch.tensor([2.0, 1.0, -1.0, 0.5], dtype=torch.float64)
    matvec = lambda v: {"v": diag * v["v"]}  # noqa: E731 - indefinite A
    b = {"v": torch.ones(4, dtype=torch.float64)}
    v, info = conjugate_gradient(matvec, b, None, maxiter=20, tol=0.0, host_scalars=host)
    assert int(info.negative_curvature) > 0 and int(info.restarts) > 0
    assert torch.isfinite(v["v"]).all() and float(torch.linalg.norm(v["v"])) < 10.0


@pytest.mark.parametrize("host", [False, True])
def test_cg_from_zero_without_progress_returns_the_bounded_steepest_descent_step(host):
    # bᵀAb < 0: every direction (b, then b again) has negative curvature, so CG takes no step
    diag = torch.tensor([2.0, 1.0, -5.0, 0.3], dtype=torch.float64)
    matvec = lambda v: {"v": diag * v["v"]}  # noqa: E731
    b = {"v": torch.ones(4, dtype=torch.float64)}
    v, info = conjugate_gradient(matvec, b, None, maxiter=5, tol=0.0, host_scalars=host)
    assert torch.equal(v["v"], torch.zeros(4, dtype=torch.float64)) and int(info.fallbacks) == 0
    v, info = conjugate_gradient(matvec, b, None, 5, 0.0, fallback_lr=0.1, host_scalars=host)
    assert torch.allclose(v["v"], 0.1 * b["v"], rtol=0, atol=1e-15) and int(info.fallbacks) == 1
    expected = torch.linalg.norm(b["v"] - 0.1 * diag * b["v"])
    assert torch.allclose(info.residual, expected, rtol=1e-14)
    # a solve that makes progress keeps its CG iterate
    v, info = conjugate_gradient(lambda v: {"v": diag.abs() * v["v"]}, b, None, 4, 0.0, 0.1, host)
    assert int(info.fallbacks) == 0 and torch.allclose(v["v"], 1 / diag.abs(), rtol=1e-12)


@pytest.mark.parametrize(("options", "eta"), [({}, 0.1), ({"fallback_lr": 0.3}, 0.3)])
def test_cg_does_not_return_a_silent_zero_when_grad_f_has_negative_curvature(options, eta):
    # at x = y = 0, b = −c and bᵀ∇²_yy g b = 2 + 1 − 5 + 0.3 < 0; ∇²_xy g = −I, so hg = v: the
    # unguarded answer would be v = 0, hg = ∇_x f = 0 (x frozen); the fallback is v = η b
    problem, x, y0, c = _diagonal_problem(-5.0)
    method = bl.method("cg", inner_steps=0, inner_lr=0.1, solver_tol=0.0, **options)
    state = method.init(problem, x, y0)
    hg, state = method.step(problem, x, state)
    assert torch.allclose(hg["x"], -eta * c, rtol=0, atol=1e-15)
    assert int(state.info["fallbacks"]) == 1
    positive_definite, x, y0, _ = _diagonal_problem(0.5)
    state = method.init(positive_definite, x, y0)
    _, state = method.step(positive_definite, x, state)
    assert int(state.info["fallbacks"]) == 0


def _indefinite_problem():
    """A tanh network's lower loss far from a minimum: ½‖y‖² scaled down, a fitting term
    whose Hessian is indefinite near y = 0, and x entering as per-weight decays."""
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(32, 3, generator=gen, dtype=torch.float64)
    targets = torch.randn(32, generator=gen, dtype=torch.float64)
    y0 = {
        "w1": torch.randn(3, 8, generator=gen, dtype=torch.float64),
        "w2": torch.randn(8, generator=gen, dtype=torch.float64),
    }

    def predict(y, a):
        return torch.tanh(a @ y["w1"]) @ y["w2"]

    def lower(x, y, _):
        fit = torch.mean((predict(y, inputs) - targets) ** 2)
        return fit + 1e-3 * sum(torch.exp(x[k]) * torch.sum(y[k] ** 2) for k in y)

    def upper(x, y, _):
        return torch.mean((predict(y, inputs[:16]) + targets[:16]) ** 2)

    x0 = {k: torch.zeros((), dtype=torch.float64) for k in y0}
    return bl.Problem(upper=upper, lower=lower), x0, y0


def test_cg_v_stays_bounded_over_200_outer_steps_on_an_indefinite_hessian():
    problem, x0, y0 = _indefinite_problem()
    norms = []

    def record(ctx):
        v_norm = float(bl.tree.norm(ctx.state.v))
        norms.append(v_norm)
        return {"v_norm": v_norm}

    method = bl.method("cg", inner_steps=1, inner_lr=0.05, solver_iters=10, solver_tol=0.0)
    result = bl.solve(problem, x0, y0, method, steps=200, outer_lr=1e-2, callbacks=[record])
    info = result.state.info
    assert int(info["negative_curvature"]) > 0 and int(info["restarts"]) > 0
    rows = result.history
    assert all("residual" in r and "hypergradient_norm" in r for r in rows)
    assert max(norms) < 1e4 and max(r["hypergradient_norm"] for r in rows) < 1e3


def test_the_unguarded_solve_would_have_met_negative_curvature():
    # the same problem's Hessian at the start is indefinite (so the test above tests the guard)
    problem, x0, y0 = _indefinite_problem()
    flat = bl.tree.flatten(y0)

    def lower_flat(w):
        return problem.lower(x0, bl.tree.unflatten(w, y0), None)

    hessian = torch.autograd.functional.hessian(lower_flat, flat)
    assert float(torch.linalg.eigvalsh(hessian)[0]) < 0


@pytest.mark.parametrize("name", ["cg", "neumann", "subbio", "lancbio", "soba", "amigo"])
def test_implicit_methods_refuse_an_x_free_lower_loss(name):
    task = make("sinusoid", hidden=4, meta_batch=2, k_shot=3, n_query=3, eval_tasks=2)
    with pytest.raises(ValueError, match=r"does not depend on x.*init_lower.*itd.*proximal"):
        bl.hypergrad(task.problem, task.x0, None, bl.method(name))


def test_solve_error_names_the_linear_solve():
    # A + ρI has an eigenvalue 1e-4: CG solves it, and v ≈ 1e4·b along it is far beyond the
    # bound ‖b‖/ρ of a positive semi-definite A; the error names the solve, not the inner loop
    problem, x, y0, _ = _diagonal_problem(-0.0999)
    method = bl.method("cg", inner_steps=0, ridge=0.1, solver_iters=4, solver_tol=0.0)
    with pytest.raises(bl.NonFiniteError, match=r"linear solve .*broke down.*ridge.*itd"):
        bl.hypergrad(problem, x, y0, method)


@pytest.mark.parametrize("host", [False, True])
def test_cg_returns_a_nan_residual_and_no_finite_v_after_a_nan_product(host):
    # a NaN product must not pass unseen: not behind the start, not behind a finite v
    b = {"v": torch.ones(3, dtype=torch.float64)}
    nan_product = lambda p: {"v": p["v"] * float("nan")}  # noqa: E731
    v, info = conjugate_gradient(nan_product, b, None, 4, 0.0, host_scalars=host)
    assert torch.isnan(info.residual) and not torch.isfinite(v["v"]).any()


@pytest.mark.parametrize("host", [False, True])
def test_cg_that_grows_returns_its_start_exactly(host):
    # a finite solve whose residual ends 10× above its start's gives back the start, bit for bit
    diag = torch.tensor([1.0, -0.999], dtype=torch.float64)  # bᵀAb ≈ 0: α ≈ 2000 overshoots
    matvec = lambda v: {"v": diag * v["v"]}  # noqa: E731
    b = {"v": torch.tensor([1.0, 1.0], dtype=torch.float64)}
    x0 = {"v": torch.tensor([0.9, 0.1], dtype=torch.float64)}
    for start in (None, x0):
        v, info = conjugate_gradient(matvec, b, start, maxiter=1, tol=0.0, host_scalars=host)
        expected = torch.zeros(2, dtype=torch.float64) if start is None else x0["v"]
        assert int(info.restarts) >= 1 and torch.equal(v["v"], expected)


def test_a_nan_hessian_product_inside_cg_is_named_as_the_linear_solve():
    # |y|^1.5 has a gradient at y = 0 (zero) but no second derivative: every HVP is non-finite,
    # while the inner and upper gradients are finite
    problem = bl.Problem(
        upper=lambda x, y, _: 0.5 * torch.sum((y["y"] - 1.0) ** 2),
        lower=lambda x, y, _: 0.5 * torch.sum(y["y"] ** 2)
        + torch.sum(torch.abs(y["y"]) ** 1.5)
        - y["y"] @ x["x"],
    )
    x, y0 = {"x": torch.zeros(3, dtype=torch.float64)}, {"y": torch.zeros(3, dtype=torch.float64)}
    method = bl.method("cg", inner_steps=0, solver_iters=3, solver_tol=0.0)
    with pytest.raises(bl.NonFiniteError, match=r"linear solve .*broke down.*non-finite"):
        bl.hypergrad(problem, x, y0, method)


@pytest.mark.parametrize("name", ["neumann", "fixed_point"])
def test_a_step_above_two_over_lambda_max_is_warned_then_named_when_it_diverges(name):
    problem, x, y_star, a, b, c = _quadratic()
    method = bl.method(name, inner_steps=0, solver_iters=20, solver_lr=50.0)
    warned = pytest.warns(RuntimeWarning, match="solver_lr=50 is at least 2/λ_max")
    with warned, pytest.raises(bl.NonFiniteError, match=r"diverged.*lower solver_lr"):
        bl.hypergrad(problem, x, y_star, method)


@pytest.mark.parametrize("name", ["neumann", "fixed_point"])
def test_curvature_that_outgrows_the_first_steps_check_stops_the_run(name):
    # ∇²_yy g = eˣ I grows as x does (the hypergradient is −3 whatever x): η = 1.5 is below
    # 2/λ_max = 2 at x = 0, so the first step's check is silent, and above it from x ≈ 0.3
    problem = bl.Problem(
        upper=lambda x, y, _: 0.5 * torch.sum(y["y"] ** 2) - 3.0 * x["x"],
        lower=lambda x, y, _: 0.5 * torch.exp(x["x"]) * torch.sum((y["y"] - 1.0) ** 2),
    )
    x = {"x": torch.zeros((), dtype=torch.float64)}
    y = {"y": torch.ones(3, dtype=torch.float64)}
    method = bl.method(name, inner_steps=0, solver_iters=5, solver_lr=1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(bl.NonFiniteError, match=r"diverged at outer step (\d+)") as caught:
            bl.solve(problem, x, y, method, steps=20, outer_optimizer="sgd", outer_lr=0.1)
    step = int(re.search(r"outer step (\d+)", str(caught.value)).group(1))
    assert 1 <= step <= 5  # x = 0.3·step: diverging 10× in 5 HVPs needs eˣ > 1.72


def test_stationary_solvers_flag_divergence_only_above_two_over_lambda_max():
    a = torch.diag(torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64))
    b = {"v": torch.ones(3, dtype=torch.float64)}
    matvec = lambda v: {"v": a @ v["v"]}  # noqa: E731
    for lr, diverged in [(0.45, False), (0.8, True)]:  # 2/λ_max = 0.5
        _, series = neumann(matvec, b, lr, 10)
        _, iteration = fixed_point(matvec, b, None, lr, 10)
        assert bool(series.diverged) is diverged
        assert bool(iteration.diverged) is diverged


def test_imaml_preset_gives_implicit_methods_an_x_dependent_lower_loss():
    task = make(
        "sinusoid", hidden=4, meta_batch=2, k_shot=5, n_query=5, eval_tasks=2, proximal=10.0,
        dtype=torch.float64,
    )  # fmt: skip
    hg = bl.hypergrad(task.problem, task.x0, None, bl.method("cg", **task.method_options("cg")))
    assert float(bl.tree.norm(hg)) > 0 and bool(bl.tree.all_finite(hg))


def test_imaml_cg_matches_the_dense_implicit_formula():
    # F's finite differences need y* to high precision, which GD on the ReLU sinusoid network
    # does not reach (its gradient chatters at the kinks); so the check is the implicit formula
    # −(∇²_xy g)ᵀ (∇²_yy g)⁻¹ ∇_y f by dense matrices at the method's own inner iterate
    task = make(
        "sinusoid", hidden=4, meta_batch=2, k_shot=5, n_query=5, eval_tasks=2, proximal=10.0,
        dtype=torch.float64,
    )  # fmt: skip
    problem, x = task.problem, bl.tree.detach(task.x0)
    method = bl.method("cg", inner_steps=50, inner_lr=0.05, solver_iters=200, solver_tol=1e-14)
    state = method.init(problem, x, None)
    problem.next_task()
    batch = problem.current_task
    hg, state = method.step(problem, x, state)
    fy, fx = bl.tree.flatten(state.y), bl.tree.flatten(x)

    def lower_grad(u, w):
        y = bl.tree.unflatten(w, state.y)
        return torch.func.grad(lambda y_: problem.lower(bl.tree.unflatten(u, x), y_, batch))(y)

    flat_grad = lambda u, w: bl.tree.flatten(lower_grad(u, w))  # noqa: E731
    hessian = torch.autograd.functional.jacobian(lambda w: flat_grad(fx, w), fy)
    mixed = torch.autograd.functional.jacobian(lambda u: flat_grad(u, fy), fx)
    b = torch.func.grad(lambda w: problem.upper(x, bl.tree.unflatten(w, state.y), batch))(fy)
    exact = -mixed.T @ torch.linalg.solve(hessian, b)
    assert float((bl.tree.flatten(hg) - exact).norm() / exact.norm()) < 1e-10


def test_damped_lancbio_rejects_a_v_longer_than_b_over_ridge():
    # A has an eigenvalue −0.099 (A + ρI: 0.001): the damped system is positive definite, so
    # the Lanczos solve passes its pivot tests, but its v, ~1000·b along that direction, is
    # far beyond ‖b‖/ρ, the bound for A ⪰ 0; every such step must fall back and be counted
    ridge = 0.1
    problem, x, y0, c = _diagonal_problem(-0.099)
    method = bl.method("lancbio", inner_steps=0, m=3, ridge=ridge)
    state = method.init(problem, x, y0)
    bound = float(torch.linalg.norm(c)) / ridge  # b = ∇_y f = y0 − c
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        for _ in range(12):
            _, state = method.step(problem, x, state)
            assert float(bl.tree.norm(state.v)) <= bound * (1 + 1e-12)
    assert int(state.info["indefinite"]) > 0


def test_hyper_cleaning_mlp_defaults_damp_every_solve_through_per_method_blocks():
    from bilevel.tasks.hyper_cleaning import RIDGE_MLP, RIDGE_MLP_LANCBIO

    mlp = make("hyper_cleaning", dataset="digits", model="mlp", n_train=50, n_val=50)
    assert mlp.method_options("lancbio")["ridge"] == RIDGE_MLP_LANCBIO
    for name in ("cg", "neumann", "subbio", "soba", "stocbio", "amigo", "fixed_point"):
        assert mlp.method_options(name)["ridge"] == RIDGE_MLP, name
    assert "ridge" not in mlp.method_options("itd")
    assert mlp.method_options("neumann")["solver_warm_start"] is True  # measured to help there
    linear = make("hyper_cleaning", dataset="digits", n_train=50, n_val=50)
    assert all("ridge" not in linear.method_options(n) for n in ("cg", "lancbio", "subbio"))
    assert "solver_warm_start" not in linear.method_options("neumann")


@pytest.mark.parametrize(
    ("name", "options", "steps"), [("lancbio", {"m": 6}, 12), ("subbio", {"solver_lr": 0.2}, 300)]
)
def test_damped_krylov_methods_reach_the_damped_closed_form(name, options, steps):
    # a convex lower level: LancBiO's ball (‖v‖ ≤ ‖b‖/ρ) never binds, the damped solve is exact
    ridge = 0.3
    problem, x, y_star, a, b, c = _quadratic()
    method = bl.method(name, inner_steps=0, ridge=ridge, **options)
    hg = bl.hypergrad(problem, x, y_star, method, steps=steps)
    damped = a + ridge * torch.eye(len(a), dtype=a.dtype)
    exact = x["x"] + b.T @ torch.linalg.solve(damped, y_star["y"] - c)
    assert relative_error(hg, {"x": exact}) < 1e-8

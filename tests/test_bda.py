"""BDA: reverse mode vs finite differences of an independently unrolled φ_K, the one-stage
formula, the non-singleton toy (where LLS methods fail), replaceable inner modules, exact oracle
counts and option errors."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl
from bilevel.inner import Momentum, run_aggregated
from bilevel.tasks import quadratic
from bilevel.tasks.lls_toy import lls_toy

from helpers import finite_difference, relative_error

F64 = torch.float64


def smooth_problem(init_lower: bool = False):
    """Non-quadratic f and g, both depending on x and y (so every second-order term appears)."""
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(4, 3, generator=gen, dtype=F64)
    B = torch.randn(4, 4, generator=gen, dtype=F64)
    C = torch.randn(4, 3, generator=gen, dtype=F64)

    def lower(x, y, batch):
        r = B @ y["w"] - A @ x["a"]
        return torch.sum(torch.log(torch.cosh(r))) + 0.5 * torch.sum(y["w"] ** 2)

    def upper(x, y, batch):
        return torch.sum(torch.sin(y["w"])) + 0.5 * torch.sum(
            (y["w"] - torch.tanh(C @ x["a"])) ** 2
        )

    start = (lambda x: {"w": 0.3 * torch.tanh(A @ x["a"])}) if init_lower else None
    x = {"a": torch.tensor([0.2, -0.5, 0.7], dtype=F64)}
    y = {"w": torch.tensor([0.1, 0.0, -0.2, 0.3], dtype=F64)}
    return bl.Problem(upper=upper, lower=lower, init_lower=start), x, y


def aggregated_value(problem, x, y0, weights, s_u, s_l, beta=None):
    """φ_K(x) = f(x, y_K(x)) with y_K from the aggregated steps, by plain torch.autograd;
    ``beta``: heavy-ball momentum on the aggregated direction (m ← βm + d; y ← y − s_l·m)."""
    y = {k: v.detach().clone() for k, v in y0.items()}
    m = {k: torch.zeros_like(v) for k, v in y.items()}
    for alpha in weights:
        yr = {k: v.requires_grad_(True) for k, v in y.items()}
        gg = torch.autograd.grad(problem.lower(x, yr, None), list(yr.values()))
        gf = torch.autograd.grad(problem.upper(x, yr, None), list(yr.values()))
        d = {
            k: alpha * (s_u / s_l) * a + (1 - alpha) * b for k, a, b in zip(y, gf, gg, strict=True)
        }
        if beta is not None:
            m = {k: beta * m[k] + d[k] for k in d}
            d = m
        y = {k: (y[k] - s_l * d[k]).detach() for k in y}
    return problem.upper(x, y, None).detach()


SCHEDULES = {
    "harmonic": lambda mu, k: mu / (k + 1),
    "geometric": lambda mu, k: mu * 0.8**k,
    "constant": lambda mu, k: mu,
}


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_reverse_mode_equals_finite_differences(schedule):
    problem, x, y = smooth_problem()
    K, mu, s_u, s_l = 8, 0.6, 0.3, 0.2
    method = bl.method(
        "bda", inner_steps=K, mu=mu, s_u=s_u, inner_lr=s_l, schedule=schedule, decay=0.8
    )
    hg = bl.hypergrad(problem, x, y, method)
    weights = [SCHEDULES[schedule](mu, k) for k in range(K)]
    fd = finite_difference(lambda x_: aggregated_value(problem, x_, y, weights, s_u, s_l), x)
    assert relative_error(hg, fd) < 1e-6


def test_reverse_mode_includes_the_meta_initialisation():
    problem, x, y = smooth_problem(init_lower=True)
    K, mu, s = 6, 0.5, 0.25
    hg = bl.hypergrad(problem, x, y, bl.method("bda", inner_steps=K, mu=mu, inner_lr=s))
    weights = [mu / (k + 1) for k in range(K)]
    fd = finite_difference(
        lambda x_: aggregated_value(problem, x_, problem.init_lower(x_), weights, s, s), x
    )
    assert relative_error(hg, fd) < 1e-6


def test_mu_zero_is_exactly_itd_with_the_same_oracles():
    problem, x, y = smooth_problem()
    bda = bl.hypergrad(problem, x, y, bl.method("bda", mu=0.0, inner_steps=7, inner_lr=0.2))
    bda_counts = dict(problem.counts)
    problem.counts.clear()
    itd = bl.hypergrad(problem, x, y, bl.method("itd", inner_steps=7, inner_lr=0.2))
    torch.testing.assert_close(bda, itd, rtol=0, atol=0)
    assert bda_counts == dict(problem.counts)


def test_truncated_equals_reverse_when_truncate_is_k_and_differs_below():
    problem, x, y = smooth_problem()
    options = {"inner_steps": 6, "mu": 0.7, "inner_lr": 0.2, "s_u": 0.4}
    full = bl.hypergrad(problem, x, y, bl.method("bda", **options))
    same = bl.hypergrad(problem, x, y, bl.method("bda", mode="truncated", truncate=6, **options))
    torch.testing.assert_close(same, full, rtol=0, atol=1e-15)
    short = bl.hypergrad(problem, x, y, bl.method("bda", mode="truncated", truncate=2, **options))
    assert relative_error(short, full) > 1e-3


def test_truncated_is_the_derivative_of_the_last_steps():
    """With y_{K−k} held fixed, truncated BDA is the exact derivative of the last k steps (with
    their own α_k, not a restarted schedule)."""
    problem, x, y = smooth_problem()
    K, k, mu, s = 7, 3, 0.8, 0.2
    hg = bl.hypergrad(
        problem,
        x,
        y,
        bl.method("bda", inner_steps=K, mu=mu, inner_lr=s, mode="truncated", truncate=k),
    )
    weights = [mu / (i + 1) for i in range(K)]
    y_mid = _aggregated_iterate(problem, x, y, weights[: K - k], s)
    fd = finite_difference(
        lambda x_: aggregated_value(problem, x_, y_mid, weights[K - k :], s, s), x
    )
    assert relative_error(hg, fd) < 1e-6


def _aggregated_iterate(problem, x, y0, weights, s):
    method = bl.method("bda", inner_steps=len(weights), mu=0.0, inner_lr=s)
    with problem.uncounted():
        return run_aggregated(problem, x, y0, weights, 1.0, method.optimizer)


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_onestage_equals_its_defining_formula(alpha):
    problem, x, y0 = smooth_problem()
    K, eta, r = 5, 0.2, 0.01
    method = bl.method("bda", mode="onestage", inner_steps=K, mu=alpha, inner_lr=eta)
    hg = bl.hypergrad(problem, x, y0, method)

    # independent: K constant-α steps, v = ∇_y f(x, y_K), ε = r/‖v‖, central difference of
    # ∇_x φ_α (φ_α = (1 − α) g + α f) at the perturbed initial point
    y = {k: v.clone() for k, v in y0.items()}
    for _ in range(K):
        yr = {k: v.requires_grad_(True) for k, v in y.items()}
        phi = (1 - alpha) * problem.lower(x, yr, None) + alpha * problem.upper(x, yr, None)
        (d,) = torch.autograd.grad(phi, [yr["w"]])
        y = {"w": (y["w"] - eta * d).detach()}
    xr = {"a": x["a"].clone().requires_grad_(True)}
    yr = {"w": y["w"].clone().requires_grad_(True)}
    f_x, v = torch.autograd.grad(problem.upper(xr, yr, None), [xr["a"], yr["w"]])
    eps = r / torch.linalg.norm(v)

    def phi_x(w):
        phi = (1 - alpha) * problem.lower(xr, {"w": w}, None) + alpha * problem.upper(
            xr, {"w": w}, None
        )
        return torch.autograd.grad(phi, [xr["a"]])[0]

    expected = f_x - eta * (phi_x(y0["w"] + eps * v) - phi_x(y0["w"] - eps * v)) / (2 * eps)
    torch.testing.assert_close(hg["a"], expected, rtol=1e-12, atol=1e-14)


def test_onestage_with_one_step_is_reverse_mode_on_a_quadratic():
    """For K = 1 the one-stage correction is the exact reverse-mode term, and the central
    difference is exact when ∇_x φ is linear in y (a quadratic problem)."""
    task = quadratic(dim_x=3, dim_y=5, seed=2)
    options = {"inner_steps": 1, "mu": 0.3, "inner_lr": 0.1, "schedule": "constant"}
    one = bl.hypergrad(task.problem, task.x0, task.y0, bl.method("bda", mode="onestage", **options))
    rev = bl.hypergrad(task.problem, task.x0, task.y0, bl.method("bda", **options))
    assert relative_error(one, rev) < 1e-9


def _solve(task, method, steps, **options):
    return bl.solve(
        task.problem,
        task.x0,
        task.y0,
        bl.method(method, **task.method_options(method, **options)),
        callbacks=task.callbacks,
        **{**task.solve_defaults, "steps": steps},
    )


def test_lls_toy_1d_bda_finds_the_optimistic_solution_where_lls_methods_do_not():
    task = lls_toy(dim=1)
    bda = _solve(task, "bda", 40, mu=0.99, s_u=1.0)  # μ·s_u near 1: fast
    assert abs(float(bda.x["x"]) - 1.0) < 0.02
    assert bda.history[-1]["upper_value"] < 1e-3
    # one-stage, constant α = 0.5, K = 16: heads for its own limit 0.943 (300 steps)
    assert float(_solve(task, "bda", 40, mode="onestage").x["x"]) > 0.85
    for name in ("itd", "neumann"):
        assert abs(float(_solve(task, name, 40).x["x"]) - 0.5) < 0.01
    # cg on the singular ∇²_yy g (b is not in its range) has no stationary point here: its
    # first step already leaves a component along the null direction, so it ends at neither
    # 0.5 nor 1 (0.002 measured)
    cg = float(_solve(task, "cg", 40).x["x"])
    assert abs(cg - 0.5) > 0.4 and abs(cg - 1.0) > 0.4


def test_lls_toy_100_dimensions():
    task = lls_toy(dim=100)
    bda = _solve(task, "bda", 40, mu=0.99, s_u=1.0)
    assert bda.history[-1]["distance"] < 0.05
    assert _solve(task, "itd", 40).history[-1]["distance"] > 0.4


def test_momentum_inner_module_is_used():
    problem, x, y = smooth_problem()
    K, mu, s_u, s_l, beta = 6, 0.5, 0.3, 0.1, 0.9
    options = {"inner_steps": K, "mu": mu, "s_u": s_u}
    hg = bl.hypergrad(
        problem, x, y, bl.method("bda", inner_optimizer=Momentum(s_l, beta), **options)
    )
    weights = [mu / (k + 1) for k in range(K)]
    fd = finite_difference(
        lambda x_: aggregated_value(problem, x_, y, weights, s_u, s_l, beta=beta), x
    )
    assert relative_error(hg, fd) < 1e-6
    plain = bl.hypergrad(problem, x, y, bl.method("bda", inner_lr=s_l, **options))
    assert relative_error(hg, plain) > 1e-2
    by_name = bl.hypergrad(
        problem, x, y, bl.method("bda", inner_optimizer="momentum", inner_lr=s_l, **options)
    )
    torch.testing.assert_close(by_name, hg, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["nesterov", "adam"])
def test_other_inner_modules_run_and_differ_from_gd(name):
    problem, x, y = smooth_problem()
    options = {"inner_steps": 5, "mu": 0.5, "inner_lr": 0.05}
    gd = bl.hypergrad(problem, x, y, bl.method("bda", **options))
    other = bl.hypergrad(problem, x, y, bl.method("bda", inner_optimizer=name, **options))
    assert torch.isfinite(other["a"]).all() and relative_error(other, gd) > 1e-3


def _counts(**options) -> dict:
    problem, x, y = smooth_problem()
    bl.hypergrad(problem, x, y, bl.method("bda", **options))
    return dict(problem.counts)


def test_oracle_counts_per_mode():
    assert _counts(inner_steps=9) == {
        "lower_grad": 9,
        "upper_grad": 10,
        "hvp": 9,
        "mixed": 9,
        "upper_hvp": 9,
        "upper_mixed": 9,
    }
    assert _counts(inner_steps=9, mode="truncated", truncate=4) == {
        "lower_grad": 9,
        "upper_grad": 10,
        "hvp": 4,
        "mixed": 4,
        "upper_hvp": 4,
        "upper_mixed": 4,
    }
    # μ = 0 skips every ∇_y f (the counts of itd)
    assert _counts(inner_steps=5, mu=0.0) == {
        "lower_grad": 5,
        "upper_grad": 1,
        "hvp": 5,
        "mixed": 5,
    }
    assert _counts(inner_steps=9, mode="onestage") == {
        "lower_grad": 9,
        "upper_grad": 9 + 1 + 2,
        "lower_grad_x": 2,
    }
    assert _counts(inner_steps=4, mode="onestage", mu=0.0) == {
        "lower_grad": 4,
        "upper_grad": 1,
        "lower_grad_x": 2,
    }


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mode": "forward"}, "unknown mode"),
        ({"schedule": "cosine"}, "unknown schedule"),
        ({"mu": 1.5}, "mu must be in"),
        ({"mu": "0.5"}, "mu must be a number"),
        ({"inner_optimizer": Momentum(0.2), "inner_lr": 0.1}, "inner_optimizer.lr"),
        ({"s_u": -1.0}, "s_u must be a positive"),
        ({"inner_lr": 0.0}, "inner_lr must be a positive"),
        ({"decay": 1.5, "schedule": "geometric"}, "decay must be in"),
        ({"mode": "truncated"}, "needs truncate"),
        ({"mode": "truncated", "truncate": -1}, "truncate must be an integer"),
        ({"truncate": 3}, "truncate applies"),
        ({"mode": "onestage", "schedule": "harmonic"}, "holds α constant"),
        ({"mode": "onestage", "inner_optimizer": "adam"}, "needs inner_optimizer='gd'"),
        ({"mu_lr": 0}, "mu_lr must be a positive"),
        ({"fd_radius": -0.1}, "fd_radius must be a positive"),
    ],
)
def test_bad_options_raise_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        bl.method("bda", **options)


def test_unknown_option_lists_the_options():
    with pytest.raises(TypeError, match="s_u"):
        bl.method("bda", alpha=0.3)


def test_s_l_is_inner_lr():
    with pytest.raises(TypeError, match="'s_l' is now 'inner_lr'"):
        bl.method("bda", s_l=0.3)
    assert bl.method("bda", inner_lr=0.3).s_l == 0.3
    method = bl.method("bda", inner_optimizer=Momentum(0.25))
    assert method.s_l == method.inner_lr == 0.25 and method.s_u == 0.25
    assert bl.method("bda").s_l == 0.1
    task = lls_toy(dim=1)
    assert task.method_options("bda") == {
        "inner_lr": 0.5,
        "inner_steps": 16,
        "warm_start": False,
        "s_u": 0.5,
        "mu": 0.5,
    }


@pytest.mark.parametrize("mode", ["reverse", "onestage"])
def test_float32_keeps_dtype_and_agrees_with_float64(mode):
    problem, x, y = smooth_problem()
    method = bl.method("bda", mode=mode, inner_steps=5, mu=0.5, inner_lr=0.2)
    ref = bl.hypergrad(problem, x, y, method)
    x32 = {k: v.float() for k, v in x.items()}
    y32 = {k: v.float() for k, v in y.items()}
    problem32 = bl.Problem(
        upper=lambda x_, y_, b: problem.upper(_double(x_), _double(y_), b).float(),
        lower=lambda x_, y_, b: problem.lower(_double(x_), _double(y_), b).float(),
    )
    hg = bl.hypergrad(problem32, x32, y32, method)
    assert hg["a"].dtype == torch.float32
    assert relative_error({"a": hg["a"].double()}, ref) < (1e-5 if mode == "reverse" else 1e-2)


def _double(tree):
    return {k: v.double() for k, v in tree.items()}


def test_learnable_mu_takes_a_hypergradient_step_on_mu():
    problem, x, y = smooth_problem()
    K, mu, s, lr = 6, 0.4, 0.2, 0.05
    method = bl.method("bda", schedule="learnable", inner_steps=K, mu=mu, inner_lr=s, mu_lr=lr)
    state = method.init(problem, x, y)
    hg, state = method.step(problem, x, state)

    def value(m):
        return aggregated_value(problem, x, y, [m / (k + 1) for k in range(K)], s, s)

    h = 1e-5
    d_mu = (value(mu + h) - value(mu - h)) / (2 * h)
    assert state.mu.dtype == F64 and state.mu.shape == ()
    torch.testing.assert_close(state.mu, mu - lr * d_mu, rtol=0, atol=1e-9)
    fixed = bl.hypergrad(problem, x, y, bl.method("bda", inner_steps=K, mu=mu, inner_lr=s))
    torch.testing.assert_close(hg, fixed, rtol=0, atol=1e-14)
    # μ stays in [0, 1]
    state.mu = torch.tensor(1.0, dtype=F64)
    for _ in range(3):
        _, state = bl.method("bda", schedule="learnable", mu_lr=1e3).step(problem, x, state)
        assert 0.0 <= float(state.mu) <= 1.0

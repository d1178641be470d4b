"""SOBA, stocBiO and AmIGO against closed forms on random quadratics, exact oracle and batch
counts, and unbiasedness / batch-size behaviour of the stochastic estimates."""

from __future__ import annotations

import math

import pytest
import torch

import bilevel as bl
from bilevel.methods.implicit import POWER_ITERS
from bilevel.problem import Problem, validate
from bilevel.tasks import quadratic
from bilevel.tasks.quadratic import QuadraticData, lower_loss, quadratic_data, upper_loss

from helpers import relative_error, strictly_decreasing

CONVERGED = {
    "soba": ({"inner_lr": 1.0, "solver_lr": 1.0}, 300),
    "stocbio": ({"inner_steps": 400, "inner_lr": 1.0, "solver_lr": 1.0, "solver_iters": 400}, 1),
    "amigo-cg": ({"inner_steps": 20, "inner_lr": 1.0, "solver_tol": 0.0}, 40),
    "amigo-gd": ({"inner_steps": 20, "inner_lr": 1.0, "solver": "gd", "solver_lr": 1.0}, 40),
}


def _method(key: str, **options) -> bl.Method:
    name = key.split("-")[0]
    return bl.method(name, **options)


def _trajectory(task, method: bl.Method, steps: int) -> list[float]:
    """Relative error of the estimate after each of ``steps`` method steps at fixed x
    (what ``bl.hypergrad(..., steps=n)`` returns, for every n at once)."""
    exact = task.metadata["data"].hypergradient(task.x0)
    x, y = validate(task.problem, task.x0, task.y0)
    state = method.init(task.problem, x, y)
    errors = []
    for _ in range(steps):
        hg, state = method.step(task.problem, x, state)
        errors.append(relative_error(hg, exact))
    return errors


def _rate(errors: list[float], start: int, stop: int) -> float:
    """Geometric mean contraction factor of the error between two steps (1-based)."""
    return (errors[stop - 1] / errors[start - 1]) ** (1.0 / (stop - start))


# ------------------------------------------------------------------ deterministic, closed form
@pytest.mark.parametrize("key", list(CONVERGED))
@pytest.mark.parametrize("instance", [(3, 6, 5.0, 0), (5, 10, 10.0, 1)], ids=["k5", "k10"])
def test_converges_to_exact_hypergradient(key, instance):
    dim_x, dim_y, condition, seed = instance
    task = quadratic(dim_x=dim_x, dim_y=dim_y, condition=condition, seed=seed)
    options, steps = CONVERGED[key]
    hg = bl.hypergrad(task.problem, task.x0, task.y0, _method(key, **options), steps=steps)
    assert hg["x"].dtype == torch.float64
    assert relative_error(hg, task.metadata["data"].hypergradient(task.x0)) < 1e-6


@pytest.mark.parametrize(("inner_lr", "solver_lr"), [(1.0, 0.5), (0.5, 1.0)])
def test_soba_error_contracts_at_the_slower_step_size_rate(inner_lr, solver_lr):
    # A has eigenvalues in [0.1, 1]: y contracts like 1 − inner_lr·0.1, v like 1 − solver_lr·0.1
    # and is driven by y, so the hypergradient error contracts like the slower of the two
    task = quadratic(dim_x=5, dim_y=10, condition=10.0, seed=1)
    method = bl.method("soba", inner_lr=inner_lr, solver_lr=solver_lr)
    errors = _trajectory(task, method, 200)
    expected = 1.0 - min(inner_lr, solver_lr) * 0.1
    assert abs(_rate(errors, 100, 200) - expected) < 2e-3, _rate(errors, 100, 200)
    assert strictly_decreasing(errors[20::20]), errors[20::20]


def test_soba_hypergradient_uses_the_iterates_before_the_step():
    # the first estimate, with v₀ = 0 at y₀, is ∇_x f(x, y₀) = λx + Mᵀy₀ in closed form
    task = quadratic(dim_x=3, dim_y=6, seed=0)
    d, x = task.metadata["data"], task.x0
    y0 = {"y": torch.randn(6, dtype=torch.float64)}
    hg = bl.hypergrad(task.problem, x, y0, bl.method("soba"), steps=1)
    torch.testing.assert_close(hg["x"], d.lam * x["x"] + d.M.T @ y0["y"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("solver_lr", [1.0, 0.5])
def test_stocbio_error_decays_like_one_minus_lr_mu_to_the_j(solver_lr):
    task = quadratic(dim_x=5, dim_y=10, condition=10.0, seed=1)
    exact = task.metadata["data"].hypergradient(task.x0)
    # the second eigenvalue 0.2 contracts like 1 − 0.2η: measure late, where the smallest wins
    terms = [50, 100, 150, 200]
    errors = [
        relative_error(
            bl.hypergrad(
                task.problem,
                task.x0,
                task.y0,
                bl.method(
                    "stocbio",
                    inner_steps=400,
                    inner_lr=1.0,
                    solver_lr=solver_lr,
                    solver_iters=j,
                ),
            ),
            exact,
        )
        for j in terms
    ]
    assert strictly_decreasing(errors), errors
    measured = (errors[-1] / errors[1]) ** (1.0 / (terms[-1] - terms[1]))
    assert abs(measured - (1.0 - solver_lr * 0.1)) < 2e-3, measured


@pytest.mark.parametrize("key", ["amigo-cg", "amigo-gd"])
def test_amigo_warm_start_improves_the_estimate_across_outer_steps(key):
    # few solver steps per outer step: the warm-started v carries the work over
    task = quadratic(dim_x=5, dim_y=10, condition=10.0, seed=1)
    options = {"inner_steps": 10, "inner_lr": 1.0, "solver_iters": 2}
    if key == "amigo-gd":
        options.update(solver="gd", solver_lr=1.0)
    else:
        options.update(solver_tol=0.0)
    errors = _trajectory(task, _method(key, **options), 80)
    # strictly better every 10 steps until float64 rounding (~1e-15) is reached, then stays there
    above_rounding = [e for e in errors[::10] if e > 1e-12]
    assert len(above_rounding) >= 4 and strictly_decreasing(above_rounding), errors[::10]
    assert errors[-1] < 1e-6


@pytest.mark.parametrize(
    ("ours", "options", "reference"),
    [
        ("stocbio", {"solver_iters": 7, "solver_lr": 0.8}, "neumann"),
        ("amigo", {"solver_iters": 3, "solver_tol": 0.0}, "cg"),
        ("amigo", {"solver": "gd", "solver_iters": 3, "solver_lr": 0.8}, "fixed_point"),
    ],
)
def test_full_batch_equals_the_deterministic_aid_method(ours, options, reference):
    # same math: without mini-batches the fresh-batch solvers are the AID solvers
    task = quadratic(dim_x=3, dim_y=6, seed=0)
    common = {"inner_steps": 4, "inner_lr": 0.9}
    shared = {k: v for k, v in options.items() if k != "solver"}
    a = bl.hypergrad(task.problem, task.x0, task.y0, bl.method(ours, **common, **options), 3)
    b = bl.hypergrad(task.problem, task.x0, task.y0, bl.method(reference, **common, **shared), 3)
    assert torch.equal(a["x"], b["x"])


@pytest.mark.parametrize("key", list(CONVERGED))
def test_state_v_solves_the_linear_system(key):
    # state.y, state.v are what a residual diagnostic ‖A v − b‖ reads
    task = quadratic(dim_x=3, dim_y=6, condition=5.0, seed=0)
    d: QuadraticData = task.metadata["data"]
    options, steps = CONVERGED[key]
    method = _method(key, **options)
    x, y = validate(task.problem, task.x0, task.y0)
    state = method.init(task.problem, x, y)
    for _ in range(max(steps, 2)):
        _, state = method.step(task.problem, x, state)
    b = d.H @ (state.y["y"] - d.t) + d.M @ x["x"]
    assert float(torch.linalg.norm(d.A @ state.v["y"] - b) / torch.linalg.norm(b)) < 1e-8


# ------------------------------------------------------------------ oracle counts
def _counts(key: str, steps: int, **options) -> dict:
    task = quadratic(dim_x=3, dim_y=6, seed=0)
    bl.hypergrad(task.problem, task.x0, task.y0, _method(key, **options), steps=steps)
    return dict(task.problem.counts)


def test_soba_counts():
    # full batch: the HVP and the mixed product share one linearisation per step
    assert _counts("soba", 3) == {
        "lower_grad": 3,
        "upper_grad": 3,
        "linearize": 3,
        "hvp": 3,
        "mixed": 3,
    }
    assert _counts("soba", 2, inner_steps=4) == {
        "lower_grad": 8,
        "upper_grad": 2,
        "linearize": 2,
        "hvp": 2,
        "mixed": 2,
    }


def test_stocbio_counts_j_hvps():
    # J = solver_iters HVPs, a series of J + 1 terms (the first term is b itself)
    assert _counts("stocbio", 2, inner_steps=3, solver_iters=5) == {
        "lower_grad": 6,
        "upper_grad": 2,
        "linearize": 2,
        "hvp": 10 + POWER_ITERS,  # the first step's step-size check
        "mixed": 2,
    }


def test_amigo_counts():
    k, j = 3, 4
    # cg: the warm start costs one HVP for its residual from the second step on
    assert _counts("amigo-cg", 3, inner_steps=k, solver_iters=j, solver_tol=0.0) == {
        "lower_grad": 3 * k,
        "upper_grad": 3,
        "linearize": 3,
        "hvp": j + 2 * (j + 1),
        "mixed": 3,
    }
    assert _counts("amigo-gd", 3, inner_steps=k, solver_iters=j, solver="gd") == {
        "lower_grad": 3 * k,
        "upper_grad": 3,
        "linearize": 3,
        "hvp": 3 * j + POWER_ITERS,  # the first step's step-size check
        "mixed": 3,
    }


# ------------------------------------------------------------------ stochastic (mini-batches)
class Stream:
    """An endless iterable of random mini-batches (each one the mean of ``batch_size`` samples)."""

    def __init__(self, draw, batch_size: int, seed: int) -> None:
        self.draw, self.batch_size = draw, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        while True:
            yield self.draw(self.batch_size, self.generator)


def noisy_quadratic(
    d: QuadraticData, sigma: float, batch_size: int = 1, seed: int = 0, scale: float = 0.0
) -> tuple[Problem, Problem]:
    """(stochastic, full-batch) problems: every lower batch uses (1 + ε)A + E (ε = ±``scale``,
    E symmetric Gaussian) and perturbs B and c, every upper batch adds a linear term zᵀy, all
    with zero mean (per sample; a batch averages ``batch_size`` samples), so the full-batch
    problem is ``d`` itself. The lower Hessian varies across batches."""
    n, m = d.B.shape

    def noise(bs, gen, *shape):
        return sigma * torch.randn(bs, *shape, generator=gen, dtype=d.A.dtype).mean(0)

    def lower_draw(bs, gen):
        e = noise(bs, gen, n, n)
        signs = 2.0 * torch.randint(0, 2, (bs,), generator=gen, dtype=d.A.dtype) - 1.0
        return {
            "A": (1.0 + scale * signs.mean()) * d.A + 0.5 * (e + e.T),
            "B": d.B + noise(bs, gen, n, m),
            "c": d.c + noise(bs, gen, n),
        }

    def lower(x, y, batch):
        if batch is None:
            return lower_loss(d, x, y)
        yv = y["y"]
        return 0.5 * yv @ (batch["A"] @ yv) - yv @ (batch["B"] @ x["x"] + batch["c"])

    def upper(x, y, batch):
        extra = 0.0 if batch is None else y["y"] @ batch["z"]
        return upper_loss(d, x, y) + extra

    stochastic = Problem(
        upper=upper,
        lower=lower,
        lower_data=Stream(lower_draw, batch_size, seed),
        upper_data=Stream(lambda bs, gen: {"z": noise(bs, gen, n)}, batch_size, seed + 1),
    )
    return stochastic, Problem(upper=upper, lower=lower)


def _start(d: QuadraticData) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(5)
    x = {"x": torch.randn(d.B.shape[1], generator=gen, dtype=d.A.dtype)}
    return x, {"y": torch.randn(d.B.shape[0], generator=gen, dtype=d.A.dtype)}


STOCHASTIC = {
    "soba": ({"inner_lr": 1.0, "solver_lr": 1.0}, 4),
    "stocbio": ({"inner_steps": 3, "inner_lr": 1.0, "solver_lr": 1.0, "solver_iters": 6}, 2),
    "amigo-gd": ({"inner_steps": 3, "inner_lr": 1.0, "solver": "gd", "solver_lr": 1.0}, 2),
    "amigo-cg": ({"inner_steps": 3, "inner_lr": 0.5, "solver_iters": 3, "solver_tol": 0.0}, 2),
}


@pytest.mark.parametrize(
    ("key", "lower_per_step"),
    [("soba", 1 + 2), ("stocbio", 3 + 6 + 1), ("amigo-gd", 3 + 5 + 1), ("amigo-cg", 3 + 1 + 1)],
)
def test_each_oracle_draws_a_fresh_batch(key, lower_per_step):
    # soba: K inner + HVP + mixed; stocbio: K + J + mixed; amigo gd: K + J + mixed;
    # amigo cg: K + one batch for all CG products + mixed. One upper batch per step.
    problem, _ = noisy_quadratic(quadratic_data(dim_x=3, dim_y=6, seed=0), sigma=0.05)
    options, _ = STOCHASTIC[key]
    x, y = _start(quadratic_data(dim_x=3, dim_y=6, seed=0))
    bl.hypergrad(problem, x, y, _method(key, **options), steps=3)
    assert dict(problem.batches_drawn) == {"lower": 3 * lower_per_step, "upper": 3}


def _samples(problem: Problem, x, y, method: bl.Method, steps: int, n: int) -> torch.Tensor:
    return torch.stack([bl.hypergrad(problem, x, y, method, steps=steps)["x"] for _ in range(n)])


@pytest.mark.parametrize("key", ["soba", "stocbio", "amigo-gd"])
def test_stochastic_estimate_is_unbiased_for_the_full_batch_one(key):
    # all three are linear in v with every factor on an independent batch, so on a quadratic
    # (even with a batch-dependent Hessian) the mean estimate is the full-batch estimate.
    # The noise is mostly a random scale of the Hessian, so reusing one batch for all the
    # solver's products (E[(1 + ε)²] ≠ 1) would shift the mean: measured ~5.5 standard errors
    d = quadratic_data(dim_x=3, dim_y=6, condition=5.0, seed=0)
    problem, full = noisy_quadratic(d, sigma=0.02, scale=0.8)
    x, y = _start(d)
    options, steps = STOCHASTIC[key]
    method = _method(key, **options)
    target = bl.hypergrad(full, x, y, method, steps=steps)["x"]
    n = 200
    samples = _samples(problem, x, y, method, steps, n)
    spread = float(samples.var(0).sum().sqrt())
    standard_error = spread / math.sqrt(n)
    assert spread > 0.05 * float(torch.linalg.norm(target))  # the noise is real
    assert 4 * standard_error < 0.15 * float(torch.linalg.norm(target))  # the test is sharp
    assert float(torch.linalg.norm(samples.mean(0) - target)) < 4 * standard_error


# CG on a mini-batch Hessian that is indefinite blows up (mean squared error ~1e6 at
# sigma = 0.1, batch size 1): keep its Hessian noise small enough for A_j ≻ 0
@pytest.mark.parametrize(("key", "sigma"), [("amigo-cg", 0.02), ("soba", 0.1)])
def test_mean_squared_error_shrinks_with_batch_size(key, sigma):
    d = quadratic_data(dim_x=3, dim_y=6, condition=5.0, seed=0)
    x, y = _start(d)
    options, steps = STOCHASTIC[key]
    method = _method(key, **options)
    mse = []
    for batch_size in (1, 16):
        problem, full = noisy_quadratic(d, sigma, batch_size=batch_size, seed=batch_size)
        target = bl.hypergrad(full, x, y, method, steps=steps)["x"]
        samples = _samples(problem, x, y, method, steps, 64)
        mse.append(float(((samples - target) ** 2).sum(1).mean()))
    # variance (and, for CG, the bias) scale like 1/batch_size: expect a ratio near 16
    assert 6 < mse[0] / mse[1] < 40, mse


# ------------------------------------------------------------------ dtypes and options
@pytest.mark.parametrize("key", list(CONVERGED))
def test_float32(key):
    task = quadratic(dim_x=3, dim_y=6, condition=5.0, seed=0, dtype=torch.float32)
    options, steps = CONVERGED[key]
    hg = bl.hypergrad(task.problem, task.x0, task.y0, _method(key, **options), steps=steps)
    assert hg["x"].dtype == torch.float32
    exact = task.metadata["data"].hypergradient(task.x0)
    assert relative_error(hg, exact) < 1e-4


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("soba", {"inner_steps": 0}, "inner_steps must be an integer >= 1"),
        ("soba", {"solver_lr": 0.0}, "solver_lr must be a positive number"),
        ("soba", {"warm_start": False}, "warm_start=True"),
        ("soba", {"inner_lr": -1.0}, "inner_lr must be a positive number"),
        ("stocbio", {"solver_iters": -1}, "solver_iters must be an integer >= 0"),
        ("stocbio", {"solver_lr": -0.1}, "solver_lr must be a positive number"),
        ("amigo", {"solver": "lbfgs"}, "solver must be one of cg, gd"),
        ("amigo", {"solver_tol": -1e-3}, "solver_tol must be a number >= 0"),
        ("amigo", {"solver_iters": -1}, "solver_iters must be an integer >= 1"),
        ("amigo", {"solver": "gd", "solver_lr": "big"}, "solver_lr must be a number"),
        ("amigo", {"solver_lr": 0.5}, "solver='cg' has no solver_lr"),
        ("amigo", {"solver": "gd", "solver_tol": 0.0}, "solver='gd' has no solver_tol"),
    ],
)
def test_bad_options_raise_clear_errors(name, options, message):
    with pytest.raises(ValueError, match=message):
        bl.method(name, **options)


@pytest.mark.parametrize("name", ["soba", "stocbio", "amigo"])
def test_unknown_option_lists_the_known_ones(name):
    with pytest.raises(TypeError, match="its options are: .*solver_lr"):
        bl.method(name, solver_itres=3)

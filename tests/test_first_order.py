"""F2SA and BOME: their estimates against independent plain-autograd computations, F2SA's
O(1/λ) bias on random quadratics, BOME's convergence to (x*, y*), the many-solutions toy next
to BDA and ITD, exact oracle counts, batch use, float32 and option errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import bilevel as bl
from bilevel.tasks import quadratic
from bilevel.tasks.lls_toy import lls_toy
from bilevel.tasks.quadratic import lower_loss, quadratic_data, upper_loss

from helpers import relative_error

F64 = torch.float64


def exact_solution(data, dim_x: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x*, y*(x*)) of a quadratic task: F is quadratic, so x* = −(∇²F)⁻¹ ∇F(0)."""
    g0 = data.hypergradient({"x": torch.zeros(dim_x, dtype=F64)})["x"]
    x_star = -torch.linalg.solve(data.outer_hessian(), g0)
    return x_star, data.y_star({"x": x_star})["y"]


def autograd_grads(fn, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xr, yr = x.detach().requires_grad_(True), y.detach().requires_grad_(True)
    gx, gy = torch.autograd.grad(fn({"x": xr}, {"y": yr}, None), [xr, yr])
    return gx, gy


# --------------------------------------------------------------------------------- F2SA
def test_f2sa_bias_shrinks_like_one_over_lambda():
    task = quadratic(dim_x=4, dim_y=6, condition=5, seed=3)
    exact = task.metadata["data"].hypergradient(task.x0)
    lams = [100.0, 300.0, 1000.0, 3000.0, 10000.0]
    errors = []
    for lam in lams:
        method = bl.method("f2sa", inner_steps=1500, inner_lr=0.2, lam=lam, lam_growth=0)
        errors.append(relative_error(bl.hypergrad(task.problem, task.x0, task.y0, method), exact))
    logs = torch.tensor([[math.log(lam), 1.0] for lam in lams], dtype=F64)
    slope = torch.linalg.lstsq(logs, torch.log(torch.tensor(errors, dtype=F64))).solution[0]
    assert -1.05 < float(slope) < -0.95, errors
    assert errors[-1] < 1e-3


def test_f2sa_estimate_equals_its_definition():
    """T steps of each sequence and ∇_x f(y) + λ(∇_x g(y) − ∇_x g(z)), by plain autograd."""
    task = quadratic(dim_x=3, dim_y=5, seed=1)
    problem, x, y0 = task.problem, task.x0["x"], task.y0["y"] + 0.3
    T, eta, lam = 7, 0.4, 2.5
    method = bl.method("f2sa", inner_steps=T, inner_lr=eta, lam=lam)
    hg = bl.hypergrad(problem, task.x0, {"y": y0}, method)["x"]
    z, y = y0.clone(), y0.clone()
    for _ in range(T):
        z = z - eta * autograd_grads(problem.lower, x, z)[1]
        g_y, f_y = autograd_grads(problem.lower, x, y)[1], autograd_grads(problem.upper, x, y)[1]
        y = y - eta * (g_y + f_y / lam)
    expected = autograd_grads(problem.upper, x, y)[0] + lam * (
        autograd_grads(problem.lower, x, y)[0] - autograd_grads(problem.lower, x, z)[0]
    )
    torch.testing.assert_close(hg, expected, rtol=1e-12, atol=1e-12)


def test_f2sa_schedules_and_state():
    linear = bl.method("f2sa", lam=2.0, lam_growth=0.5, lam_max=3.0)
    assert [linear.multiplier(t) for t in range(4)] == [2.0, 2.5, 3.0, 3.0]
    assert bl.method("f2sa").multiplier(10) == pytest.approx(2.0)  # benchopt: 1 + 0.1·t
    power = bl.method("f2sa", lam=2.0, lam_schedule="power", lam_power=0.5)
    assert power.multiplier(3) == pytest.approx(4.0)
    task = quadratic(seed=0)
    result = bl.solve(task.problem, task.x0, task.y0, linear, steps=3, outer_lr=0.01)
    assert result.state.t == 3
    assert float(result.state.info["lam"]) == 3.0
    assert result.state.y_penalty.keys() == result.state.y.keys()


# --------------------------------------------------------------------------------- BOME
@pytest.mark.parametrize(("phi", "eta"), [("grad_norm", 0.7), ("value", 5.0)])
def test_bome_step_equals_its_definition(phi, eta):
    task = quadratic(dim_x=3, dim_y=5, seed=2)
    problem, x, y = task.problem, task.x0["x"], task.y0["y"] + 0.5
    T, alpha, xi = 4, 0.5, 0.05
    method = bl.method("bome", inner_steps=T, inner_lr=alpha, eta=eta, phi=phi, y_lr=xi)
    state = method.init(problem, task.x0, {"y": y})
    hg, state = method.step(problem, task.x0, state)
    y_t = y.clone()
    for _ in range(T):
        y_t = y_t - alpha * autograd_grads(problem.lower, x, y_t)[1]
    f_x, f_y = autograd_grads(problem.upper, x, y)
    g_x, g_y = autograd_grads(problem.lower, x, y)
    q_x, q_y = g_x - autograd_grads(problem.lower, x, y_t)[0], g_y
    squared = q_x @ q_x + q_y @ q_y
    if phi == "grad_norm":
        barrier = eta * squared
    else:
        lower = problem.lower
        barrier = eta * (lower({"x": x}, {"y": y}, None) - lower({"x": x}, {"y": y_t}, None))
    lam = torch.clamp(barrier - (f_x @ q_x + f_y @ q_y), min=0) / squared
    assert float(lam) > 0  # the barrier is active: the test covers the λ∇q term
    torch.testing.assert_close(hg["x"], f_x + lam * q_x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.y["y"], y - xi * (f_y + lam * q_y), rtol=1e-12, atol=1e-12)


def test_bome_without_constraint_gradient_is_plain_descent_on_f():
    """At y = y*(x) exactly (every value below is exact in binary), ∇q = 0: λ = 0, not NaN,
    and d = ∇f."""
    task = lls_toy(dim=2)
    x = {"x": torch.full((2,), 0.5, dtype=F64)}
    y = {"y1": x["x"].clone(), "y2": torch.full((2,), 0.25, dtype=F64)}
    method = bl.method("bome", inner_steps=3, inner_lr=0.5, y_lr=0.5)
    state = method.init(task.problem, x, y)
    hg, state = method.step(task.problem, x, state)
    assert float(state.info["lam"]) == 0.0
    torch.testing.assert_close(hg["x"], x["x"] - y["y2"], rtol=0, atol=0)  # ∇_x f
    torch.testing.assert_close(state.y["y2"], y["y2"] + 0.5 * 0.25, rtol=0, atol=0)


def run_bome(task, xi: float, steps: int, inner_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's update: one step ξ for x (SGD on the returned d_x) and for y."""
    method = bl.method("bome", inner_steps=inner_steps, inner_lr=1.0, y_lr=xi)
    x = {"x": task.x0["x"].clone()}
    state = method.init(task.problem, x, task.y0)
    for _ in range(steps):
        hg, state = method.step(task.problem, x, state)
        x = {"x": x["x"] - xi * hg["x"]}
    return x["x"], state.y["y"]


def test_bome_converges_to_the_bilevel_solution_as_the_step_shrinks():
    """With a constant step ξ, BOME settles in an O(ξ) neighbourhood of (x*, y*(x*)) (near
    the constraint λ∇q stays of the size of ∇f, so the iterates hop across it): halving ξ
    halves the distance."""
    task = quadratic(dim_x=2, dim_y=4, condition=2, seed=0, outer_strength=1.0)
    x_star, y_star = exact_solution(task.metadata["data"], 2)
    distances = []
    for xi in (0.04, 0.02):
        x, y = run_bome(task, xi, steps=int(20 / xi), inner_steps=8)
        distances.append(
            (float(torch.linalg.norm(x - x_star) / torch.linalg.norm(x_star)),
             float(torch.linalg.norm(y - y_star) / torch.linalg.norm(y_star)))
        )  # fmt: skip
    (x_far, y_far), (x_near, y_near) = distances
    assert x_near < 0.05 and y_near < 0.12, distances
    assert 1.6 < x_far / x_near < 2.6 and 1.6 < y_far / y_near < 2.6, distances


# ------------------------------------------------------------- many lower-level solutions
def _solve_toy(method: str, steps: int, outer_lr: float, **options):
    task = lls_toy(dim=2)
    return bl.solve(
        task.problem,
        task.x0,
        task.y0,
        bl.method(method, **task.method_options(method, **options)),
        steps=steps,
        outer_optimizer="sgd",
        outer_lr=outer_lr,
        log_every=steps,
    )


def test_lls_toy_f2sa_bome_and_bda_reach_the_optimistic_solution_itd_does_not():
    """S(x) = {(x, t)}: the optimistic solution is x* = y₁ = y₂ = e; LLS methods from y = 0
    end at x = e/2. F2SA's penalised sequence picks the f-best point of S(x) and its estimate
    is λ/(1 + λ)·(x − e), so x → e for any λ; z (``state.y``) stays an argmin of g, (x, 0).
    BOME's joint y reaches (e, e) too (up to its O(ξ) step bias)."""
    e = torch.ones(2, dtype=F64)
    f2sa = _solve_toy("f2sa", 100, 0.5, lam=10.0, warm_start=True)
    torch.testing.assert_close(f2sa.x["x"], e, rtol=0, atol=1e-8)
    torch.testing.assert_close(f2sa.state.y_penalty["y2"], e, rtol=0, atol=1e-6)
    torch.testing.assert_close(f2sa.y["y1"], e, rtol=0, atol=1e-6)
    torch.testing.assert_close(f2sa.y["y2"], 0 * e, rtol=0, atol=0)
    bome = _solve_toy("bome", 200, 0.2, y_lr=0.2)
    torch.testing.assert_close(bome.x["x"], e, rtol=0, atol=1e-3)
    torch.testing.assert_close(bome.y["y2"], e, rtol=0, atol=1e-3)
    bda = _solve_toy("bda", 40, 0.5, mu=0.99, s_u=1.0)
    torch.testing.assert_close(bda.x["x"], e, rtol=0, atol=0.02)
    itd = _solve_toy("itd", 40, 0.5)
    torch.testing.assert_close(itd.x["x"], e / 2, rtol=0, atol=0.01)


# ------------------------------------------------------------------- counts and batches
def test_oracle_counts_are_exact():
    task = quadratic(seed=0)
    T = 6
    bl.hypergrad(task.problem, task.x0, task.y0, bl.method("f2sa", inner_steps=T), steps=2)
    assert dict(task.problem.counts) == {
        "lower_grad": 2 * 2 * T, "upper_grad": 2 * (T + 1), "lower_grad_x": 2 * 2,
    }  # fmt: skip
    for phi, evals in (("grad_norm", {}), ("value", {"lower_eval": 2 * 2})):
        task.problem.counts.clear()
        method = bl.method("bome", inner_steps=T, phi=phi)
        bl.hypergrad(task.problem, task.x0, task.y0, method, steps=2)
        assert dict(task.problem.counts) == {
            "lower_grad": 2 * (T + 1), "upper_grad": 2, "lower_grad_x": 2 * 2, **evals,
        }  # fmt: skip


def batched_quadratic(seen: list):
    """A quadratic whose lower loss is scaled by the batch (an integer id), logging every id
    the lower loss is called with (also under torch.func transforms)."""
    data = quadratic(dim_x=2, dim_y=3, seed=0).metadata["data"]

    def lower(x, y, batch):
        seen.append(batch)
        return (1 + 0.1 * batch) * (0.5 * y["y"] @ (data.A @ y["y"]) - y["y"] @ (data.B @ x["x"]))

    def upper(x, y, batch):
        return (1 + 0.1 * batch) * 0.5 * torch.sum((y["y"] - 1) ** 2) + 0.5 * x["x"] @ x["x"]

    problem = bl.Problem(upper, lower, lower_data=range(100), upper_data=range(100))
    return problem, {"x": torch.ones(2, dtype=F64)}, {"y": torch.zeros(3, dtype=F64)}


def test_minibatch_draws_and_shared_batches():
    """F2SA: per inner step one lower batch feeds both sequences, and one lower batch serves
    both ∇_x g terms; BOME: one lower batch per inner step, one for all of ∇q. Estimates are
    reproducible from the batch streams alone."""
    T = 3
    for name, lower_draws, upper_draws in (("f2sa", T + 1, T + 1), ("bome", T + 1, 1)):
        seen: list = []
        problem, x, y = batched_quadratic(seen)
        method = bl.method(name, inner_steps=T, inner_lr=0.3)
        hg = bl.hypergrad(problem, x, y, method)
        assert problem.batches_drawn == {"lower": lower_draws, "upper": upper_draws}
        seen = seen[1:]  # bl.hypergrad's validation evaluates the lower loss once, on batch 0
        if name == "f2sa":
            assert seen == [0, 0, 1, 1, 2, 2, 3, 3]
        else:
            assert seen == [0, 1, 2, 3, 3, 3]
        again = bl.hypergrad(batched_quadratic([])[0], x, y, method)
        torch.testing.assert_close(again, hg, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["f2sa", "bome"])
def test_float32(name):
    """The same quadratic (float32 data, and the same numbers in float64): the float32 run
    keeps its dtype and agrees with the float64 one."""
    data = quadratic_data(dim_x=3, dim_y=6, seed=0, dtype=torch.float32)
    results = {}
    for dtype in (torch.float32, F64):
        d = dataclasses.replace(data, **{k: getattr(data, k).to(dtype) for k in "ABcHtM"})
        problem = bl.Problem(
            upper=lambda x, y, batch, d=d: upper_loss(d, x, y),
            lower=lambda x, y, batch, d=d: lower_loss(d, x, y),
        )
        x, y = {"x": torch.ones(3, dtype=dtype)}, {"y": torch.zeros(6, dtype=dtype)}
        method = bl.method(name, inner_steps=50, inner_lr=0.5)
        hg = bl.hypergrad(problem, x, y, method, steps=3)
        assert hg["x"].dtype == dtype
        results[dtype] = {"x": hg["x"].double()}
    assert relative_error(results[torch.float32], results[F64]) < 1e-4


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("f2sa", {"inner_steps": 0}, "inner_steps must be an integer >= 1"),
        ("f2sa", {"lam": 0.0}, "lam must be a positive number"),
        ("f2sa", {"lam_schedule": "exponential"}, "unknown lam_schedule 'exponential'"),
        ("f2sa", {"lam_power": 0.5}, "lam_power applies to lam_schedule='power' only"),
        ("f2sa", {"lam_schedule": "power", "lam_growth": 1.0}, "lam_growth applies to"),
        ("f2sa", {"lam_growth": -0.1}, "lam_growth must be a number >= 0"),
        ("f2sa", {"lam": 5.0, "lam_max": 2.0}, r"lam_max \(2.0\) must be >= lam \(5.0\)"),
        ("bome", {"inner_steps": 0}, "inner_steps must be an integer >= 1"),
        ("bome", {"eta": 0}, "eta must be a positive number"),
        ("bome", {"phi": "gap"}, "unknown phi 'gap'"),
        ("bome", {"y_lr": -1.0}, "y_lr must be a positive number"),
    ],
)
def test_bad_options_are_rejected(name, options, message):
    with pytest.raises(ValueError, match=message):
        bl.method(name, **options)


def test_unknown_option_lists_the_options():
    with pytest.raises(TypeError, match="has no option.*lambda.*lam_schedule"):
        bl.method("f2sa", **{"lambda": 3.0})
    assert isinstance(bl.method("bome"), bl.methods.BOME)
    assert isinstance(bl.method("f2sa"), bl.methods.F2SA)


@pytest.mark.parametrize("name", ["f2sa", "bome"])
def test_checkpoint_resume_is_bit_exact(tmp_path, name):
    """The step counter (F2SA's λ schedule) and the second sequence / joint y are checkpointed."""
    method = bl.method(name, inner_steps=4, inner_lr=0.5)
    task = quadratic(seed=0)
    full = bl.solve(task.problem, task.x0, task.y0, method, steps=8, outer_lr=0.05)
    path = tmp_path / "run.pt"
    common = {"outer_lr": 0.05, "checkpoint": path, "checkpoint_every": 4}
    bl.solve(task.problem, task.x0, task.y0, method, steps=4, **common)
    resumed = bl.solve(task.problem, task.x0, task.y0, method, steps=8, **common)
    assert torch.equal(resumed.x["x"], full.x["x"])
    assert torch.equal(resumed.y["y"], full.y["y"])
    if name == "f2sa":
        assert resumed.state.t == 8
        assert torch.equal(resumed.state.y_penalty["y"], full.state.y_penalty["y"])

"""SGLD stochastic bilevel (method ``sgld``): sampler and the three hypergradient estimators
against closed forms.

The test problem ``gibbs_quadratic`` has an x-dependent inner curvature, so F_τ differs from the
deterministic F and the 1/τ covariance term matters:

    g(x, y) = ½ yᵀ A(x) y − yᵀ(β ⊙ x + c),    A(x) = A0 + diag(exp x)
    f(x, y) = ½ (y − t)ᵀ H (y − t) + yᵀ M x + ½ λ ‖x‖²

p_τ(·|x) = N(y*(x), τ A(x)⁻¹), so E f = f(x, y*) + τ/2 · tr(H A(x)⁻¹) and ∇F_τ is that closed form
differentiated by autograd. SGLD with step η has the Gaussian stationary law
N(y*, Σ_η), Σ_η = τ (A − η A²/2)⁻¹ (exact for every stable η), so each estimator's expectation on
the chain is also closed form: the path-wise estimators (forward, diagonal) target
∇ [f(x, y*) + ½ tr(H Σ_η)], the covariance estimator E[∇_x f] − Cov(f, ∇_x g)/τ under N(y*, Σ_η)
(Gaussian moment formulas below). The Monte-Carlo tests compare with those targets, so the
step-size bias is accounted for exactly and measured separately.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import bilevel as bl
from bilevel.methods.langevin import chain_average
from bilevel.tasks.quadratic import lower_loss, quadratic, quadratic_data, upper_loss

from helpers import relative_error

DT = torch.float64
N = 4
LAM = 0.1
X = torch.tensor([0.3, -0.5, 0.2, -0.1], dtype=DT)


@dataclass
class Gibbs:
    A0: torch.Tensor
    beta: torch.Tensor
    c: torch.Tensor
    H: torch.Tensor
    t: torch.Tensor
    M: torch.Tensor

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return self.A0 + torch.diag(torch.exp(x))

    def y_star(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(self.A(x), self.beta * x + self.c)

    def f(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r = y - self.t
        return 0.5 * r @ self.H @ r + y @ self.M @ x + 0.5 * LAM * x @ x

    def g(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * y @ self.A(x) @ y - y @ (self.beta * x + self.c)

    def sigma(self, x: torch.Tensor, tau: float, eta: float) -> torch.Tensor:
        """Stationary covariance of SGLD with step eta (eta = 0: the Gibbs law)."""
        A = self.A(x)
        return tau * torch.linalg.inv(A - eta * A @ A / 2)

    def grad_expected(self, x: torch.Tensor, tau: float, eta: float = 0.0) -> torch.Tensor:
        """∇ E f under N(y*(x), Σ_eta(x)); eta = 0 gives the exact ∇F_τ."""
        x = x.clone().requires_grad_(True)
        value = self.f(x, self.y_star(x)) + 0.5 * torch.trace(self.H @ self.sigma(x, tau, eta))
        return torch.autograd.grad(value, x)[0]

    def covariance_parts(self, x: torch.Tensor, tau: float, eta: float):
        """(E ∇_x f, Cov(f, ∇_x g)) under N(y*, Σ_eta). For y = m + δ, quadratic forms
        ½yᵀPy + aᵀy have Cov = (Pm + a)ᵀ Σ (Qm + b) + ½ tr(P Σ Q Σ)."""
        S, m = self.sigma(x, tau, eta), self.y_star(x)
        fy = self.H @ (m - self.t) + self.M @ x
        cov = []
        for i in range(N):
            P = torch.zeros(N, N, dtype=DT)
            P[i, i] = torch.exp(x[i])
            b = torch.zeros(N, dtype=DT)
            b[i] = self.beta[i]
            cov.append(0.5 * torch.trace(self.H @ S @ P @ S) + fy @ S @ (P @ m - b))
        return self.M.T @ m + LAM * x, torch.stack(cov)

    def problem(self) -> bl.Problem:
        # x and y share the key "w": one hyperparameter per inner weight (diagonal estimator)
        return bl.Problem(
            upper=lambda x, y, batch: self.f(x["w"], y["w"]),
            lower=lambda x, y, batch: self.g(x["w"], y["w"]),
        )


def gibbs_quadratic(dense: bool, seed: int = 0) -> Gibbs:
    gen = torch.Generator().manual_seed(seed)
    eig = torch.linspace(0.5, 1.0, N, dtype=DT)
    if dense:
        q, _ = torch.linalg.qr(torch.randn(N, N, generator=gen, dtype=DT))
        A0 = (q * eig) @ q.T
    else:
        A0 = torch.diag(eig)
    h = torch.randn(N, N, generator=gen, dtype=DT) / N**0.5
    return Gibbs(
        A0=A0,
        beta=torch.linspace(0.5, 1.0, N, dtype=DT),
        c=torch.randn(N, generator=gen, dtype=DT),
        H=h @ h.T + torch.eye(N, dtype=DT),
        t=torch.randn(N, generator=gen, dtype=DT),
        M=0.3 * torch.randn(N, N, generator=gen, dtype=DT),
    )


def sgld_hypergrad(model: Gibbs, x: torch.Tensor, **options) -> torch.Tensor:
    method = bl.method("sgld", seed=0, **options)
    y0 = {"w": torch.zeros(N, dtype=DT)}
    return bl.hypergrad(model.problem(), {"w": x}, y0, method)["w"]


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


TAU, ETA = 0.5, 0.1
CHAIN = {"temperature": TAU, "inner_lr": ETA, "chains": 512, "burn_in": 60, "inner_steps": 150}


# ----------------------------------------------------------------- the sampler
def test_sgld_samples_the_discretized_gaussian():
    """Mean → y*, covariance → τ (A − ηA²/2)⁻¹ (the discretized chain's exact law); the
    step size is large enough that the continuous-time τA⁻¹ is ruled out."""
    data = quadratic_data(dim_x=2, dim_y=3, condition=4.0, seed=1)
    problem = bl.Problem(
        upper=lambda x, y, b: upper_loss(data, x, y),
        lower=lambda x, y, b: lower_loss(data, x, y),
    )
    x, tau, eta = {"x": torch.tensor([0.5, -1.0], dtype=DT)}, 0.2, 1.0
    method = bl.method(
        "sgld", temperature=tau, inner_lr=eta, chains=4000, burn_in=60, inner_steps=2,
        estimator="covariance", seed=3,
    )  # fmt: skip
    state = method.init(problem, x, {"y": torch.zeros(3, dtype=DT)})
    _, state = method.step(problem, x, state)
    samples = state.chains["y"]
    mean, centered = samples.mean(0), samples - samples.mean(0)
    cov = centered.T @ centered / (len(samples) - 1)
    A = data.A
    discrete, continuous = tau * torch.linalg.inv(A - eta * A @ A / 2), tau * torch.linalg.inv(A)
    scale = float(torch.linalg.norm(discrete))
    assert float(torch.linalg.norm(mean - data.y_star(x)["y"])) < 0.03
    assert float(torch.linalg.norm(cov - discrete)) < 0.05 * scale
    assert float(torch.linalg.norm(continuous - discrete)) > 0.2 * scale  # the test can tell


# ----------------------------------------------------------------- estimators vs closed forms
def test_covariance_estimator_is_the_exact_identity():
    """Matches E[∇_x f] − Cov(f, ∇_x g)/τ on the chain's law within MC error; a flipped sign
    or a missing 1/τ would be far outside the tolerance. Its step-size bias (vs ∇F_τ) is
    small at η = 0.1 only because τ/η are mild; see docs/methods/langevin.md."""
    model = gibbs_quadratic(dense=True)
    hg = sgld_hypergrad(model, X, estimator="covariance", **CHAIN)
    mean_fx, cov = model.covariance_parts(X, TAU, ETA)
    target = mean_fx - cov / TAU
    tol = 0.1  # measured 0.004–0.05 over seeds 0–3
    assert distance(hg, target) < tol
    for wrong in (mean_fx + cov / TAU, mean_fx - cov):  # sign flipped, 1/τ missing
        assert distance(wrong, target) > 3 * tol
    # the law the chain samples is close to Gibbs here: bias vs the exact ∇F_τ
    assert distance(target, model.grad_expected(X, TAU)) < 0.15


def test_forward_estimator_is_the_pathwise_gradient():
    """g quadratic in y: the adjoint recurrence's expectation is the exact derivative of the
    chain's stationary E f (time reversibility), i.e. ∇F_τ up to the O(η) law bias."""
    model = gibbs_quadratic(dense=True)
    hg = sgld_hypergrad(model, X, estimator="forward", **CHAIN)
    target = model.grad_expected(X, TAU, ETA)
    tol = 0.05  # measured 0.012–0.016 over seeds 0–3
    assert distance(hg, target) < tol
    exact, deterministic = model.grad_expected(X, TAU), model.grad_expected(X, 0.0)
    assert distance(target, exact) < 0.05  # step-size bias at η = 0.1
    assert distance(deterministic, exact) > 3 * tol  # the τ/2·tr(H A⁻¹) term is seen
    fx = model.covariance_parts(X, TAU, ETA)[0]
    assert distance(2 * fx - target, target) > 3 * tol  # the correction with a wrong sign


def test_diagonal_estimator_exact_for_diagonal_curvature_and_bias_otherwise():
    """Diagonal A0: the Jacobi recurrence is the exact path-wise gradient. Dense A0: a real,
    bounded bias (measured 0.07–0.09 over seeds 0–3)."""
    tol = 0.04  # measured 0.004–0.013 over seeds 0–3
    diag = gibbs_quadratic(dense=False)
    hg = sgld_hypergrad(diag, X, estimator="diagonal", **CHAIN)
    assert distance(hg, diag.grad_expected(X, TAU, ETA)) < tol
    dense = gibbs_quadratic(dense=True)
    hg = sgld_hypergrad(dense, X, estimator="diagonal", **CHAIN)
    assert distance(hg, dense.grad_expected(X, TAU, ETA)) < 0.2  # measured 0.07–0.09


def test_first_order_forward_is_a_damped_scalar_preconditioner():
    """hessian=False (the first-order recurrence, one mixed product per step, no HVP) replaces
    A⁻¹ by η/(1 − ρ)·I: exact when A = a·I and ρ = 1 − ηa (here a = 1, τ → 0), biased
    otherwise (measured 0.15 on the dense Gibbs quadratic at ρ = 0.8, 1.0 at ρ = 0.9).
    Without damping it is rejected (the recurrence diverges)."""
    task = quadratic(dim_x=3, dim_y=5, condition=1.0)  # A = I
    eta = 0.2
    method = bl.method(
        "sgld", hessian=False, damping=1 - eta, temperature=1e-8, inner_lr=eta, chains=2,
        burn_in=150, inner_steps=20, seed=0,
    )  # fmt: skip
    hg = bl.hypergrad(task.problem, task.x0, task.y0, method)
    assert relative_error(hg, task.metadata["data"].hypergradient(task.x0)) < 1e-4
    model = gibbs_quadratic(dense=True)
    hg = sgld_hypergrad(model, X, estimator="forward", hessian=False, damping=0.8, **CHAIN)
    assert 0.08 < distance(hg, model.grad_expected(X, TAU, ETA)) < 0.4  # measured 0.15
    with pytest.raises(ValueError, match="damping < 1"):
        bl.method("sgld", hessian=False)


@pytest.mark.parametrize(
    ("estimator", "step_size", "tol"), [("forward", 1.0, 0.02), ("covariance", 0.1, 0.1)]
)
def test_small_temperature_approaches_the_deterministic_hypergradient(estimator, step_size, tol):
    """forward: exact as τ → 0 at any stable η. covariance: its step-size bias does NOT
    vanish with τ (Cov/τ sees Σ_η/τ = (A − ηA²/2)⁻¹ for every τ; measured 0.16 at η = 1), so
    it needs a small η too (bias ≤ ηλ_max/2 = 5% here)."""
    task = quadratic(dim_x=3, dim_y=5, condition=4.0)
    data = task.metadata["data"]
    method = bl.method(
        "sgld", estimator=estimator, temperature=1e-6, inner_lr=step_size, chains=256,
        burn_in=int(60 / step_size), inner_steps=100, thin=5, seed=0,
    )  # fmt: skip
    hg = bl.hypergrad(task.problem, task.x0, task.y0, method)
    assert relative_error(hg, data.hypergradient(task.x0)) < tol


def test_small_temperature_diagonal_approaches_the_deterministic_hypergradient():
    model = gibbs_quadratic(dense=False)
    options = {**CHAIN, "temperature": 1e-6, "chains": 8}
    hg = sgld_hypergrad(model, X, estimator="diagonal", **options)
    assert distance(hg, model.grad_expected(X, 0.0)) < 1e-3


# ----------------------------------------------------------------- two inner minima
def test_two_minima_sgld_weights_both_modes_deterministic_methods_pick_one():
    """g = (y² − 1)² + x·y has minima near ±1 whose validation losses differ
    (f = ½(y − 1)²: 0 and 2). ITD/CG converge to the minimum their start is in; SGLD's
    samples visit both from either start, and its estimate of F_τ and ∇F_τ matches the
    Gibbs expectation computed by quadrature."""
    problem = bl.Problem(
        upper=lambda x, y, b: 0.5 * torch.sum((y["y"] - 1) ** 2),
        lower=lambda x, y, b: torch.sum((y["y"] ** 2 - 1) ** 2 + x["x"] * y["y"]),
    )
    x, tau = {"x": torch.tensor([0.0], dtype=DT)}, 0.5
    grid = torch.linspace(-3, 3, 20001, dtype=DT)
    weight = torch.exp(-((grid**2 - 1) ** 2) / tau)
    weight = weight / weight.sum()
    f_grid = 0.5 * (grid - 1) ** 2
    expected_f = float((weight * f_grid).sum())
    # ∇F_τ = −Cov(f, ∂g/∂x)/τ = −Cov(f, y)/τ
    exact_grad = -float((weight * f_grid * grid).sum() - expected_f * (weight * grid).sum()) / tau
    for start in (0.5, -0.5):
        y0 = {"y": torch.tensor([start], dtype=DT)}
        for name in ("itd", "cg"):
            method = bl.method(name, inner_steps=200, inner_lr=0.05)
            state = method.init(problem, x, y0)
            _, state = method.step(problem, x, state)
            assert abs(float(state.y["y"]) - math.copysign(1.0, start)) < 1e-3
        method = bl.method(
            "sgld", temperature=tau, inner_lr=0.02, chains=512, burn_in=600, inner_steps=100,
            thin=10, estimator="covariance", seed=1,
        )  # fmt: skip
        state = method.init(problem, x, y0)
        hg, state = method.step(problem, x, state)
        samples = state.chains["y"][:, 0]
        assert 0.4 < float((samples > 0).to(DT).mean()) < 0.6
        sampled_f = float(torch.mean(0.5 * (samples - 1) ** 2))
        assert abs(sampled_f - expected_f) < 0.1 * expected_f
        assert abs(float(hg["x"]) - exact_grad) < 0.15 * abs(exact_grad)
    # a deterministic method's local answer: F = f(±1) = 0 or 2, the Gibbs average between
    assert 0.5 < expected_f < 1.5


# ----------------------------------------------------------------- temperature rule, chain average
def test_temperature_from_the_data_size():
    """τ = 1/N from ``data_size`` (the posterior of a mean loss over N samples) when no
    ``temperature`` is given: the same chains as ``temperature=1/N``, and a spread
    that follows τ; an explicit temperature wins; the default stays 1e-3."""
    assert bl.method("sgld").tau == 1e-3
    assert bl.method("sgld", data_size=400).tau == 1 / 400
    assert bl.method("sgld", data_size=400, temperature=0.5).tau == 0.5
    task = quadratic(dim_x=3, dim_y=5)
    runs = {}
    for name, options in {"rule": {"data_size": 4}, "explicit": {"temperature": 0.25},
                          "colder": {"data_size": 400}}.items():  # fmt: skip
        method = bl.method("sgld", inner_lr=0.1, chains=256, burn_in=100, inner_steps=1,
                           seed=3, **options)  # fmt: skip
        state = method.init(task.problem, task.x0, task.y0)
        runs[name] = method.step(task.problem, task.x0, state)[1].chains["y"]
    assert torch.equal(runs["rule"], runs["explicit"])
    spread = {k: float(v.var(0).mean()) for k, v in runs.items()}
    # g is quadratic in y and the noise is the same draw, scaled by sqrt(2ητ): variance ∝ τ
    assert 99 < spread["rule"] / spread["colder"] < 101
    with pytest.raises(ValueError, match="data_size"):
        bl.method("sgld", data_size=0)


def test_keep_samples_and_chain_average():
    """``state.samples`` holds the last ``keep_samples`` used chain states; their mean is
    ``state.y`` when they are all of this step's samples; ``chain_average`` is the mean of a
    prediction over them, which for a non-linear prediction is not the prediction at
    ``state.y`` (E[y²] − (E y)² = Var y > 0)."""
    task = quadratic(dim_x=3, dim_y=5)
    options = {"temperature": 0.1, "inner_lr": 0.1, "chains": 3, "inner_steps": 4, "seed": 0}
    method = bl.method("sgld", keep_samples=12, **options)
    state = method.init(task.problem, task.x0, task.y0)
    _, state = method.step(task.problem, task.x0, state)
    samples = state.samples["y"]
    assert samples.shape == (12, 5)
    torch.testing.assert_close(samples.mean(0), state.y["y"])
    average = chain_average(lambda y: y["y"] ** 2, state.samples)
    torch.testing.assert_close(average, (samples**2).mean(0))
    assert bool(torch.all(average > state.y["y"] ** 2))
    torch.testing.assert_close(chain_average(lambda y: 2 * y["y"], state.samples), 2 * state.y["y"])
    # persistent chains: the window slides over outer steps and keeps the newest samples
    kept = {}
    for keep in (5, 24):
        window = bl.method("sgld", keep_samples=keep, **options)
        state = window.init(task.problem, task.x0, task.y0)
        for _ in range(2):
            _, state = window.step(task.problem, task.x0, state)
        kept[keep] = state.samples["y"]
    assert kept[5].shape == (5, 5) and kept[24].shape == (24, 5)
    assert torch.equal(kept[24][:12], samples)  # the first outer step's samples, in order
    assert torch.equal(kept[5], kept[24][-5:])
    # restarted chains (warm_start=False) start a new window every outer step
    cold = bl.method("sgld", keep_samples=100, warm_start=False, **options)
    state = cold.init(task.problem, task.x0, task.y0)
    for _ in range(2):
        _, state = cold.step(task.problem, task.x0, state)
    assert state.samples["y"].shape == (12, 5)
    assert bl.method("sgld", **options).init(task.problem, task.x0, task.y0).samples is None
    with pytest.raises(ValueError, match="keep_samples"):
        bl.method("sgld", keep_samples=-1)


# ----------------------------------------------------------------- reproducibility, options
def test_seeded_runs_repeat_and_resume_bit_exact(tmp_path):
    task = quadratic(dim_x=3, dim_y=5)
    method = bl.method("sgld", temperature=0.01, inner_lr=0.5, chains=2, inner_steps=5)

    def run(steps: int, checkpoint=None):
        return bl.solve(
            task.problem, task.x0, task.y0, method, steps=steps, outer_lr=0.05, seed=7,
            checkpoint=checkpoint, checkpoint_every=3,
        )  # fmt: skip

    full = run(8)
    assert torch.equal(run(8).x["x"], full.x["x"])
    path = tmp_path / "run.pt"
    run(5, path)
    resumed = run(8, path)
    assert torch.equal(resumed.x["x"], full.x["x"])
    assert torch.equal(resumed.y["y"], full.y["y"])
    other = bl.solve(task.problem, task.x0, task.y0, method, steps=8, outer_lr=0.05, seed=8)
    assert not torch.equal(other.x["x"], full.x["x"])  # the noise follows solve's seed


def test_oracle_counts():
    task = quadratic(dim_x=3, dim_y=5)
    cases = {
        # used steps: one linearisation gives the drift, the HVP and the mixed product
        "forward": {
            "lower_grad": 3 * 3,
            "linearize": 3 * 4,
            "upper_grad": 3 * 4,
            "hvp": 3 * 4,
            "mixed": 3 * 3,
        },
        "covariance": {"lower_grad": 3 * 7, "upper_grad": 9, "upper_eval": 9, "lower_grad_x": 9},
    }
    for estimator, expected in cases.items():
        task.problem.counts.clear()
        method = bl.method(
            "sgld", estimator=estimator, chains=3, burn_in=2, inner_steps=5, thin=2, seed=0
        )
        state = method.init(task.problem, task.x0, task.y0)
        method.step(task.problem, task.x0, state)
        assert dict(task.problem.counts) == expected
    # diagonal: one JVP per step replaces the inner gradient
    model = gibbs_quadratic(dense=False)
    problem = model.problem()
    method = bl.method("sgld", estimator="diagonal", chains=2, inner_steps=4, seed=0)
    state = method.init(problem, {"w": X}, {"w": torch.zeros(N, dtype=DT)})
    method.step(problem, {"w": X}, state)
    assert dict(problem.counts) == {"jvp": 8, "linearize": 8, "hvp": 8, "upper_grad": 8}


def test_minibatches_and_float32_module():
    """Stochastic inner gradients (lower_data) on an nn.Module inner model in float32: the
    estimate keeps x's dtype, is finite, and points like the full-batch one."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 3, generator=gen)
    targets = torch.sin(inputs.sum(1, keepdim=True))
    batches = [(inputs[i : i + 16], targets[i : i + 16]) for i in range(0, 64, 16)]

    def lower(x, y, batch):
        a, t = batch if batch is not None else (inputs, targets)
        fit = torch.mean((torch.func.functional_call(model, y, (a,)) - t) ** 2)
        return fit + 0.5 * torch.exp(x["log_decay"]) * sum(torch.sum(p**2) for p in y.values())

    def upper(x, y, batch):
        return torch.mean((torch.func.functional_call(model, y, (inputs,)) - targets) ** 2)

    x = {"log_decay": torch.tensor(-3.0)}
    options = {"temperature": 1e-5, "inner_lr": 0.1, "chains": 4, "burn_in": 200, "seed": 0}
    full = bl.hypergrad(bl.Problem(upper, lower), x, bl.params(model), bl.method("sgld", **options))
    stochastic = bl.hypergrad(
        bl.Problem(upper, lower, lower_data=batches),
        x,
        bl.params(model),
        bl.method("sgld", **options),
    )
    assert stochastic["log_decay"].dtype == torch.float32
    assert torch.isfinite(stochastic["log_decay"])
    assert float(stochastic["log_decay"]) * float(full["log_decay"]) > 0


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="estimator must be one of"):
        bl.method("sgld", estimator="reverse")
    with pytest.raises(ValueError, match="temperature"):
        bl.method("sgld", temperature=0.0)
    with pytest.raises(ValueError, match="at least 2 samples"):
        bl.method("sgld", estimator="covariance", chains=1, inner_steps=1)
    with pytest.raises(TypeError, match="no option"):
        bl.method("sgld", inner_optimizer="adam")
    task = quadratic(dim_x=3, dim_y=5)
    with pytest.raises(ValueError, match="one hyperparameter per inner weight"):
        bl.hypergrad(task.problem, task.x0, task.y0, bl.method("sgld", estimator="diagonal"))

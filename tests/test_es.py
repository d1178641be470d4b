"""ESJ, ESJ-S and HOZOG: unbiasedness, 1/√Q error, antithetic pairs, the sphere distribution's
bias, exact oracle counts, common batches, splittable directions and finite differences.

The exact reference everywhere is the gradient of F_N(x) = f(x, y_N(x)) with the same inner
dynamics, from ``itd`` (itself checked against closed forms and finite differences elsewhere).
"""

from __future__ import annotations

import math

import pytest
import torch

import bilevel as bl
from bilevel.methods.es import ESJ, direction_seed, draw_direction
from bilevel.tasks import quadratic

from helpers import logistic_l2_problem, relative_error

N, LR = 10, 1.0  # GD with lr 1 on the quadratic task: y_N is linear in x


def _itd(problem, x, y, **options) -> dict:
    return bl.hypergrad(problem, x, y, bl.method("itd", **options))


def _direction_terms(method: ESJ, problem, x, y) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The method's estimate and, recomputed here from its trajectories, every direction's own
    single-direction estimate [Q, |x|] (so the Monte-Carlo standard error is known)."""
    hg = bl.hypergrad(problem, x, y, method)
    state = method.init(problem, x, y)
    paths = method.run_paths(problem, x, state, range(method.directions))
    gx, gy = problem.grad_upper(x, paths.y)
    diff = torch.cat([(paths.ys[k] - paths.y[k]).flatten(1) for k in gy], 1)
    coef = diff @ bl.tree.flatten(gy) / method.radius
    u = torch.cat([paths.u[k].flatten(1) for k in x], 1)
    return hg, bl.tree.flatten(gx) + coef[:, None] * u, u


def test_mean_is_exact_hypergradient_of_f_n_on_linear_response():
    task = quadratic(dim_x=4, dim_y=6, seed=1)
    p, x, y = task.problem, task.x0, task.y0
    method = bl.method("esj", directions=4000, radius=0.1, inner_steps=N, inner_lr=LR, seed=0)
    hg, terms, _ = _direction_terms(method, p, x, y)
    mean, se = terms.mean(0), terms.std(0) / math.sqrt(terms.shape[0])
    torch.testing.assert_close(hg["x"], mean, rtol=1e-12, atol=1e-12)
    exact = _itd(p, x, y, inner_steps=N, inner_lr=LR)["x"]
    z = (mean - exact) / se
    assert z.abs().max() < 4, f"mean off the exact ∇F_N by {z} standard errors"
    assert (se / exact.norm()).max() < 0.05  # the test has power: errors are small


def test_error_falls_like_inverse_sqrt_of_directions():
    task = quadratic(dim_x=4, dim_y=6, seed=2)
    p, x, y = task.problem, task.x0, task.y0
    exact = _itd(p, x, y, inner_steps=N, inner_lr=LR)["x"]
    qs = [4, 8, 16, 32, 64, 128, 256]
    rms = []
    for q in qs:
        errors = [
            bl.hypergrad(
                p, x, y, bl.method("esj", directions=q, seed=s, inner_steps=N, inner_lr=LR)
            )["x"]
            - exact
            for s in range(24)
        ]
        rms.append(torch.stack(errors).square().sum(1).mean().sqrt())
    logs = torch.log(torch.tensor(qs, dtype=torch.float64))
    slope = torch.linalg.lstsq(
        torch.stack([logs, torch.ones_like(logs)], 1), torch.log(torch.stack(rms))[:, None]
    ).solution[0, 0]
    assert abs(float(slope) + 0.5) < 0.1, f"log-log slope {float(slope):.3f}, expected -0.5"


def _square_response_problem(dim: int = 4):
    """y*(x) = x ⊙ x (lower ½‖y − x ⊙ x‖²), f = ⟨c, y⟩ + ½‖x‖², near x = 0: a response whose
    Jacobian 2·diag(x) is small next to its curvature."""
    c = torch.linspace(0.5, 1.5, dim, dtype=torch.float64)

    def lower(x, y, batch):
        return 0.5 * torch.sum((y["y"] - x["x"] ** 2) ** 2)

    def upper(x, y, batch):
        return c @ y["y"] + 0.5 * x["x"] @ x["x"]

    x = {"x": torch.linspace(-0.05, 0.05, dim, dtype=torch.float64)}
    return bl.Problem(upper=upper, lower=lower), x, {"y": torch.zeros(dim, dtype=torch.float64)}


def test_antithetic_pairs_cut_variance_on_curved_response():
    """With a curved response the forward difference is δ = J u + (μ/2) D²y[u, u] + O(μ²);
    the second term adds (μ²/4)·E‖⟨D²y[u,u], ∇_y f⟩ u‖² to the variance. The central
    difference (y_N(x+μu) − y_N(x−μu)) / 2μ = J u + O(μ²) cancels it (exactly, for this
    quadratic response), leaving only the ⟨Ju, ∇_y f⟩u term. Where the curvature term
    dominates (small J, here near x = 0) antithetic pairs beat forward differences both at
    equal directions and at equal inner gradients (Q pairs vs 2Q forward directions)."""
    p, x, y = _square_response_problem()
    exact = _itd(p, x, y, inner_steps=5, inner_lr=0.5)["x"]

    def spread(antithetic: bool, q: int) -> float:
        estimates = [
            bl.hypergrad(
                p,
                x,
                y,
                bl.method(
                    "esj",
                    directions=q,
                    radius=0.1,
                    antithetic=antithetic,
                    seed=s,
                    inner_steps=5,
                    inner_lr=0.5,
                ),
            )["x"]
            for s in range(30)
        ]
        return float(torch.stack(estimates).sub(exact).square().sum(1).mean())

    central = spread(True, 4)
    assert central < 0.25 * spread(False, 4)
    assert central < 0.5 * spread(False, 8)


def test_sphere_per_tensor_shrinks_each_tensor_by_its_size():
    """E[u uᵀ] = blockdiag(I/d_i) for unit directions drawn per tensor: on a linear response
    the mean estimate is ∇_x f + blockdiag(1/d_i)·(indirect term), not the hypergradient."""
    task = quadratic(dim_x=8, dim_y=6, seed=3)
    sizes = {"a": 2, "b": 6}

    def join(x):
        return {"x": torch.cat([x["a"], x["b"]])}

    problem = bl.Problem(
        upper=lambda x, y, b: task.problem.upper(join(x), y, b),
        lower=lambda x, y, b: task.problem.lower(join(x), y, b),
    )
    x = {"a": task.x0["x"][:2].clone(), "b": task.x0["x"][2:].clone()}
    method = bl.method(
        "esj",
        directions=4000,
        radius=0.1,
        inner_steps=N,
        inner_lr=LR,
        distribution="sphere_per_tensor",
    )
    hg, terms, u = _direction_terms(method, problem, x, task.y0)
    assert torch.allclose(u[:, :2].norm(dim=1), torch.ones(4000, dtype=u.dtype))
    exact = _itd(problem, x, task.y0, inner_steps=N, inner_lr=LR)
    state = method.init(problem, x, task.y0)
    gx, _ = problem.grad_upper(x, method.run_paths(problem, x, state, range(0)).y)
    expected = torch.cat([gx[k] + (exact[k] - gx[k]) / sizes[k] for k in ("a", "b")])
    mean, se = terms.mean(0), terms.std(0) / math.sqrt(terms.shape[0])
    assert ((mean - expected) / se).abs().max() < 4
    truth = torch.cat([exact["a"], exact["b"]])
    assert ((mean - truth) / se).abs().max() > 20  # the bias is real and visible


@pytest.mark.parametrize(
    ("name", "antithetic", "expected"),
    [
        ("esj", False, {"lower_grad": (3 + 1) * 7, "upper_grad": 1}),
        ("esj", True, {"lower_grad": (2 * 3 + 1) * 7, "upper_grad": 1}),
        ("esj_s", False, {"lower_grad": (3 + 1) * 7, "upper_grad": 1}),
        ("hozog", False, {"lower_grad": (3 + 1) * 7, "upper_eval": 3 + 1}),
        ("hozog", True, {"lower_grad": (2 * 3 + 1) * 7, "upper_eval": 2 * 3 + 1}),
    ],
)
@pytest.mark.parametrize("batched", [True, False])
def test_oracle_counts(name, antithetic, expected, batched):
    """(Q+1)·N inner gradients ((2Q+1)·N with antithetic pairs: the unperturbed path is still
    needed for ∇f at y_N(x)); no Hessian-vector or mixed products, per outer step."""
    task = quadratic(dim_x=3, dim_y=5, seed=0)
    method = bl.method(
        name, directions=3, inner_steps=7, inner_lr=LR, antithetic=antithetic, batched=batched
    )
    bl.hypergrad(task.problem, task.x0, task.y0, method, steps=2)
    assert dict(task.problem.counts) == {k: 2 * v for k, v in expected.items()}


def test_batched_and_loop_agree_with_momentum_and_adam():
    p, x, y = logistic_l2_problem()
    for opt in ("gd", "momentum", "adam"):
        options = dict(directions=5, radius=1e-3, inner_steps=6, inner_lr=0.1, inner_optimizer=opt)
        a = bl.hypergrad(p, x, y, bl.method("esj", batched=True, seed=0, **options), steps=2)
        b = bl.hypergrad(p, x, y, bl.method("esj", batched=False, seed=0, **options), steps=2)
        assert relative_error(a, b) < 1e-9, opt


def test_auto_falls_back_to_loop_for_unvmappable_loss():
    p, x, y = logistic_l2_problem()

    def lower(x_, y_, batch):  # .item() cannot run under vmap
        return p.lower(x_, y_, batch) * (1.0 + 0.0 * float(y_["w"].sum().item()))

    problem = bl.Problem(upper=p.upper, lower=lower)
    method = bl.method("esj", directions=3, inner_steps=4, inner_lr=0.1, seed=0)
    state = method.init(problem, x, y)
    hg, state = method.step(problem, x, state)
    assert state.batched is False
    ref = bl.hypergrad(
        p, x, y, bl.method("esj", directions=3, inner_steps=4, inner_lr=0.1, seed=0)
    )
    assert relative_error(hg, ref) < 1e-12
    with pytest.raises(RuntimeError):
        bl.hypergrad(problem, x, y, bl.method("esj", batched=True, inner_steps=2))


def test_directions_are_reproducible_and_splittable():
    """Direction q of step t depends on (seed, t, q) only: shares of range(Q) computed apart
    sum to the full estimate (what a distributed wrapper does)."""
    p, x, y = logistic_l2_problem()
    method = bl.method("esj", directions=7, inner_steps=5, inner_lr=0.1)
    state = method.init(p, x, y)
    full = method.partial_estimate(p, x, state, range(7))
    shares = [method.partial_estimate(p, x, state, r) for r in (range(0, 3), range(3, 7))]
    total = bl.tree.add(shares[0].total, shares[1].total)
    assert relative_error(total, full.total) < 1e-12
    u_a = draw_direction(x, 0, 5, 2, "gaussian")
    assert torch.equal(u_a["logl2"], draw_direction(x, 0, 5, 2, "gaussian")["logl2"])
    assert not torch.equal(u_a["logl2"], draw_direction(x, 0, 6, 2, "gaussian")["logl2"])
    assert len({direction_seed(0, t, q) for t in range(20) for q in range(20)}) == 400
    # the step counter advances, so consecutive steps use fresh directions
    _, state = method.step(p, x, state)
    assert state.t == 1


def test_agrees_with_itd_in_float64_as_mu_shrinks():
    """Non-quadratic (logistic) inner problem: with antithetic pairs, μ → 0 and many
    directions ESJ converges to the exact ∇F_N; HOZOG too, more slowly."""
    p, x, y = logistic_l2_problem()
    exact = _itd(p, x, y, inner_steps=15, inner_lr=0.5)
    errors = []
    for q in (64, 4096):
        method = bl.method(
            "esj", directions=q, radius=1e-5, antithetic=True, inner_steps=15, inner_lr=0.5, seed=0
        )
        errors.append(relative_error(bl.hypergrad(p, x, y, method), exact))
    assert errors[1] < 0.05 and errors[1] < 0.25 * errors[0], errors
    hozog = bl.method(
        "hozog", directions=4096, radius=1e-5, antithetic=True, inner_steps=15, inner_lr=0.5, seed=0
    )
    assert relative_error(bl.hypergrad(p, x, y, hozog), exact) < 0.1


def _stream_problem(batch: int = 8, seed: int = 0):
    """Stochastic ridge regression with per-feature log-penalties x; mini-batch streams."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(400, 5, generator=gen, dtype=torch.float64)
    t = X @ torch.randn(5, generator=gen, dtype=torch.float64) + torch.randn(
        400, generator=gen, dtype=torch.float64
    )

    def batches():
        g = torch.Generator().manual_seed(seed + 1)
        while True:
            idx = torch.randint(0, 400, (batch,), generator=g)
            yield X[idx], t[idx]

    class Stream:
        def __iter__(self):
            return batches()

    def lower(x, y, b):
        return 0.5 * torch.mean((b[0] @ y["w"] - b[1]) ** 2) + 0.5 * torch.sum(
            torch.exp(x["l"]) * y["w"] ** 2
        )

    def upper(x, y, b):
        return 0.5 * torch.mean((b[0] @ y["w"] - b[1]) ** 2)

    problem = bl.Problem(upper=upper, lower=lower, upper_data=Stream(), lower_data=Stream())
    x = {"l": torch.zeros(5, dtype=torch.float64)}
    return problem, x, {"w": torch.zeros(5, dtype=torch.float64)}


def test_esj_s_common_batches_have_far_lower_variance():
    def spread(common: bool) -> float:
        estimates = []
        for s in range(12):
            problem, x, y = _stream_problem(seed=s)
            method = bl.method(
                "esj_s",
                directions=8,
                radius=0.01,
                inner_steps=10,
                inner_lr=0.2,
                common_batches=common,
            )
            estimates.append(bl.hypergrad(problem, x, y, method)["l"])
        return float(torch.stack(estimates).var(0).sum())

    assert spread(True) < 0.01 * spread(False)


def test_few_shot_feature_form_one_direction_shared_by_all_tasks():
    """Meta-learning form: x (conv-4) perturbed once per direction for the whole meta-batch,
    per-task heads y; batched and looped paths agree, float32 kept."""
    from bilevel.tasks import make

    out = {}
    for batched in (True, False):
        task = make(
            "few_shot", n_alphabets=6, n_characters=6, n_drawings=6, image_size=16, hidden=4,
            meta_batch=2, n_query=2, k_shot=2, n_way=3, split_sizes=(4, 1, 1),
        )  # fmt: skip
        method = bl.method("esj", directions=2, radius=0.1, inner_steps=3, batched=batched, seed=0)
        out[batched] = bl.hypergrad(task.problem, task.x0, None, method)
    assert all(v.dtype == torch.float32 for v in out[True].values())
    assert relative_error(out[True], out[False]) < 1e-4


def test_bad_options_raise():
    with pytest.raises(ValueError, match="distribution"):
        bl.method("esj", distribution="uniform")
    with pytest.raises(ValueError, match="directions"):
        bl.method("esj", directions=0)
    with pytest.raises(ValueError, match="radius"):
        bl.method("hozog", radius=0.0)
    with pytest.raises(ValueError, match="batched"):
        bl.method("esj", batched="yes")
    with pytest.raises(TypeError, match="common_batches"):
        bl.method("esj", common_batches=False)


# ------------------------------------------------------------------ seeding
def _esj_solve(task, run_seed: int, steps: int = 3, **options):
    method = bl.method("esj", inner_steps=N, inner_lr=LR, **options)
    return bl.solve(task.problem, task.x0, task.y0, method, steps=steps,
                    outer_optimizer="sgd", outer_lr=0.1, seed=run_seed)  # fmt: skip


@pytest.mark.parametrize("name", ["esj", "esj_s", "hozog"])
def test_seed_defaults_to_none(name):
    assert bl.method(name).seed is None


def test_solve_seeds_draw_different_directions_and_an_explicit_seed_reproduces():
    task = quadratic(dim_x=4, dim_y=6, seed=1)
    a, b, again = _esj_solve(task, 0), _esj_solve(task, 1), _esj_solve(task, 0)
    assert a.state.seed != b.state.seed
    u_a = draw_direction(task.x0, a.state.seed, 0, 0, "gaussian")["x"]
    assert not torch.equal(u_a, draw_direction(task.x0, b.state.seed, 0, 0, "gaussian")["x"])
    assert not torch.equal(a.x["x"], b.x["x"])
    assert torch.equal(a.x["x"], again.x["x"])  # the same run seed replays the run
    fixed = [_esj_solve(task, s, seed=5) for s in (0, 1)]  # the option overrides the run's
    assert fixed[0].state.seed == 5 and torch.equal(fixed[0].x["x"], fixed[1].x["x"])


def test_repeated_hypergrad_calls_are_independent_draws():
    task = quadratic(dim_x=4, dim_y=6, seed=1)
    method = bl.method("esj", inner_steps=N, inner_lr=LR)
    first, second = (bl.hypergrad(task.problem, task.x0, task.y0, method) for _ in range(2))
    assert not torch.equal(first["x"], second["x"])
    fixed = bl.method("esj", inner_steps=N, inner_lr=LR, seed=3)
    one, two = (bl.hypergrad(task.problem, task.x0, task.y0, fixed) for _ in range(2))
    assert torch.equal(one["x"], two["x"])


def test_mean_of_repeated_calls_converges_at_inverse_sqrt_rate():
    """Gaussian directions, y_N linear in x: each call is an independent unbiased estimate of
    ∇F_N, so the mean of n calls has RMS error ∝ n^(-1/2) (slope fitted on a log-log scale)."""
    task = quadratic(dim_x=4, dim_y=6, seed=2)
    p, x, y = task.problem, task.x0, task.y0
    exact = _itd(p, x, y, inner_steps=N, inner_lr=LR)["x"]
    method = bl.method("esj", inner_steps=N, inner_lr=LR)
    torch.manual_seed(0)
    calls, rms = [2, 8, 32, 128], []
    for n in calls:
        errors = [
            torch.stack([bl.hypergrad(p, x, y, method)["x"] for _ in range(n)]).mean(0) - exact
            for _ in range(10)
        ]
        rms.append(torch.stack(errors).square().sum(1).mean().sqrt())
    logs = torch.log(torch.tensor(calls, dtype=torch.float64))
    slope = torch.linalg.lstsq(
        torch.stack([logs, torch.ones_like(logs)], 1), torch.log(torch.stack(rms))[:, None]
    ).solution[0, 0]
    assert abs(float(slope) + 0.5) < 0.12, f"log-log slope {float(slope):.3f}, expected -0.5"
    assert rms[-1] < 0.25 * rms[0]


def test_resume_keeps_the_runs_seed_bit_exact(tmp_path):
    """The seed lives in the state: a run resumed under another solve seed still continues
    the checkpointed run's directions."""
    task = quadratic(dim_x=4, dim_y=6, seed=1)
    full = _esj_solve(task, 0, steps=6)
    path = tmp_path / "ck.pt"
    method = bl.method("esj", inner_steps=N, inner_lr=LR)
    run = dict(outer_optimizer="sgd", outer_lr=0.1, checkpoint=path, checkpoint_every=3)
    bl.solve(task.problem, task.x0, task.y0, method, steps=3, seed=0, **run)
    resumed = bl.solve(task.problem, task.x0, task.y0, method, steps=6, seed=1, **run)
    assert resumed.state.seed == full.state.seed
    assert torch.equal(full.x["x"], resumed.x["x"])


def test_direct_ablation_is_the_partial_gradient_at_y_n():
    task = quadratic(dim_x=4, dim_y=6, seed=1)
    p, x, y = task.problem, task.x0, task.y0
    hg = bl.hypergrad(p, x, y, bl.method("direct", inner_steps=N, inner_lr=LR))
    y_n = dict(y)
    for _ in range(N):  # N plain GD steps from y0, by autograd
        with torch.enable_grad():
            w = {"y": y_n["y"].clone().requires_grad_(True)}
            (g,) = torch.autograd.grad(p.lower(x, w, None), [w["y"]])
        y_n = {"y": y_n["y"] - LR * g}
    with torch.enable_grad():
        x_ = {"x": x["x"].clone().requires_grad_(True)}
        (expected,) = torch.autograd.grad(p.upper(x_, y_n, None), [x_["x"]])
    torch.testing.assert_close(hg["x"], expected, rtol=1e-12, atol=1e-12)

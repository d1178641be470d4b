"""SubBiO and LancBiO against closed forms: CG iterates, exact hypergradients, SOBA's step,
guards (breakdown, indefinite Hessians), oracle counts, float32, the m schedule, resume."""

import math
import warnings

import pytest
import torch

import bilevel as bl
from bilevel import linalg
from bilevel.tasks import QuadraticData, quadratic
from bilevel.tasks.minibatch_quadratic import minibatch_quadratic, one_batch_floor

from helpers import relative_error


def _quadratic(dtype=torch.float64, seed=0, dim_y=20, condition=10.0):
    task = quadratic(dim_x=4, dim_y=dim_y, condition=condition, seed=seed, dtype=dtype)
    return task, task.metadata["data"]


def _b(data, x, y):
    """∇_y f = H (y − t) + M x, written out from the quadratic's definition."""
    return data.H @ (y - data.t) + data.M @ x


def test_lancbio_iterates_equal_cg_iterates_with_fixed_system():
    # inner_steps=0: y, hence A and b, stay fixed; m beyond the steps: no restart
    task, data = _quadratic(dim_y=30)
    b = _b(data, task.x0["x"], task.y0["y"])
    for options in ({}, {"reorthogonalize": True}, {"window": "sliding"}):
        method = bl.method("lancbio", inner_steps=0, m=40, m_max=40, **options)
        state = method.init(task.problem, task.x0, task.y0)
        for j in range(1, 13):
            _, state = method.step(task.problem, task.x0, state)
            cg, _ = linalg.conjugate_gradient(
                lambda t: {"v": data.A @ t["v"]}, {"v": b}, None, j, tol=0.0
            )
            assert torch.allclose(state.v["y"], cg["v"], rtol=0, atol=1e-8 * float(cg["v"].norm()))


# the step η: SubBiO's and SOBA's solver step, LancBiO's fallback step
_STEP = {"lancbio": "fallback_lr", "subbio": "solver_lr", "soba": "solver_lr"}


def _error_after(name, steps, **options):
    task, data = _quadratic(seed=3)
    method = bl.method(name, inner_lr=1.0, **{_STEP[name]: 1.0}, **options)
    hg = bl.hypergrad(task.problem, task.x0, task.y0, method, steps=steps)
    return relative_error(hg, data.hypergradient(task.x0))


def test_hypergradients_converge_at_fixed_x_with_the_expected_ordering():
    lanc = {"inner_steps": 5, "m": 5, "m_max": 5}
    sub = {"inner_steps": 5}
    assert _error_after("lancbio", 60, **lanc) < 1e-6
    assert _error_after("subbio", 150, **sub) < 1e-6
    # at equal steps, the Krylov memory pays: LancBiO < SubBiO < SOBA (one v step per outer step)
    at = 40
    errors = [_error_after("lancbio", at, **lanc), _error_after("subbio", at, **sub)]
    if "soba" in bl.methods_available():
        errors.append(_error_after("soba", at, inner_steps=5))
        assert _error_after("soba", 600, inner_steps=5) < 1e-6
    assert errors == sorted(errors) and errors[0] < 1e-3 * errors[-1]


@pytest.mark.parametrize("seed", range(6))
def test_subbio_step_is_never_worse_than_soba_on_the_steps_quadratic(seed):
    task, data = _quadratic(seed=seed, condition=50.0)
    gen = torch.Generator().manual_seed(seed)
    eta = float(torch.rand((), generator=gen, dtype=torch.float64)) * 1.9 + 0.05
    method = bl.method("subbio", inner_steps=2, inner_lr=1.0, solver_lr=eta)
    state = method.init(task.problem, task.x0, task.y0)
    for _ in range(3):
        v_prev = torch.randn(20, generator=gen, dtype=torch.float64)
        state.v = {"y": v_prev.clone()}
        _, state = method.step(task.problem, task.x0, state)
        b = _b(data, task.x0["x"], state.y["y"])
        exact = torch.linalg.solve(data.A, b)

        def a_error(v, exact=exact):
            return float((v - exact) @ data.A @ (v - exact))

        soba = v_prev - eta * (data.A @ v_prev - b)
        assert a_error(state.v["y"]) <= a_error(soba) * (1 + 1e-10) + 1e-24


def _identity_problem():
    """g = ½‖y − B x‖² (Hessian I: every Krylov space has dimension 1), non-quadratic f."""
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    t = torch.randn(6, generator=gen, dtype=torch.float64)

    def upper(x, y, batch):
        return 0.5 * torch.sum((y["y"] - t) ** 2) + torch.sum(torch.sin(x["x"])) * y["y"][0]

    def lower(x, y, batch):
        return 0.5 * torch.sum((y["y"] - B @ x["x"]) ** 2)

    x = {"x": torch.randn(3, generator=gen, dtype=torch.float64)}
    y = {"y": torch.zeros(6, dtype=torch.float64)}
    exact = torch.func.grad(lambda xv: upper({"x": xv}, {"y": B @ xv}, None))(x["x"])
    return bl.Problem(upper=upper, lower=lower), x, y, exact


@pytest.mark.parametrize("name", ["lancbio", "subbio"])
def test_identity_hessian_breakdown_runs_without_nan_and_converges(name):
    problem, x, y, exact = _identity_problem()
    method = bl.method(name, inner_steps=3, inner_lr=0.5, **{_STEP[name]: 0.5})
    state = method.init(problem, x, y)
    for _ in range(40):
        hg, state = method.step(problem, x, state)
        assert bool(torch.isfinite(hg["x"]).all())
    assert relative_error(hg, {"x": exact}) < 1e-10
    if name == "lancbio":
        assert int(state.info["breakdowns"]) == 40  # every Lanczos step breaks down
        assert int(state.info["indefinite"]) == 0


def _indefinite_problem():
    """g = ½ yᵀ D y − yᵀx with D = diag(1, …, 1, −1): no minimiser; the guards must hold."""
    d = torch.ones(5, dtype=torch.float64)
    d[-1] = -1.0

    def lower(x, y, batch):
        return 0.5 * torch.sum(d * y["y"] ** 2) - y["y"] @ x["x"]

    def upper(x, y, batch):
        return 0.5 * torch.sum(y["y"] ** 2) + 0.5 * torch.sum(x["x"] ** 2)

    x = {"x": torch.linspace(1.0, 2.0, 5, dtype=torch.float64)}
    return bl.Problem(upper=upper, lower=lower), x, {"y": torch.ones(5, dtype=torch.float64)}


def test_indefinite_hessian_takes_safe_steps_warns_and_counts():
    problem, x, y = _indefinite_problem()
    method = bl.method("lancbio", inner_steps=0, m=4, m_max=4, fallback_lr=0.1)
    state = method.init(problem, x, y)
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        for _ in range(12):
            hg, state = method.step(problem, x, state)
            assert bool(tr_finite(hg)) and bool(tr_finite(state.v))
    assert int(state.info["indefinite"]) > 0
    assert state.info["restarts"] > 12 // 4  # guard restarts beyond the scheduled ones
    sub = bl.method("subbio", inner_steps=0, solver_lr=0.1)
    state = sub.init(problem, x, y)
    for _ in range(12):
        hg, state = sub.step(problem, x, state)
        assert bool(tr_finite(hg))
    assert int(state.info["fallbacks"]) > 0


def tr_finite(tree):
    return torch.stack([torch.isfinite(v).all() for v in tree.values()]).all()


def test_oracle_counts():
    def counts(name, steps, **options):
        task, _ = _quadratic()
        bl.hypergrad(task.problem, task.x0, task.y0, bl.method(name, **options), steps=steps)
        return dict(task.problem.counts)

    k, steps, m = 3, 12, 4
    # one HVP per Lanczos step + one per restart except the first (v̄ = 0): (1 + 1/m) on average
    assert counts("lancbio", steps, inner_steps=k, m=m, m_max=m) == {
        "lower_grad": k * steps,
        "upper_grad": steps,
        "linearize": steps,
        "hvp": steps + steps // m - 1,
        "mixed": steps,
    }
    assert counts("lancbio", steps, inner_steps=k, m=m, m_max=m, window="sliding")["hvp"] == steps
    assert counts("subbio", steps, inner_steps=k) == {
        "lower_grad": k * steps,
        "upper_grad": steps,
        "linearize": steps,
        "hvp": 3 * steps,
        "mixed": steps,
    }


@pytest.mark.parametrize("name", ["lancbio", "subbio"])
def test_float32_stays_finite_and_accurate(name):
    task, data = _quadratic(dtype=torch.float32, seed=1)
    extra = {"m": 5, "m_max": 5} if name == "lancbio" else {}
    method = bl.method(name, inner_steps=5, inner_lr=1.0, **{_STEP[name]: 1.0}, **extra)
    hg = bl.hypergrad(task.problem, task.x0, task.y0, method, steps=150)
    assert hg["x"].dtype == torch.float32 and bool(torch.isfinite(hg["x"]).all())
    wide = QuadraticData(
        **{k: getattr(v, "double", lambda v=v: v)() for k, v in vars(data).items()}
    )
    exact = wide.hypergradient({"x": task.x0["x"].double()})
    assert relative_error({"x": hg["x"].double()}, exact) < 1e-4


def test_m_schedule_grows_at_restarts_up_to_the_cap():
    task, _ = _quadratic()
    method = bl.method("lancbio", inner_steps=1, inner_lr=1.0, m=1, m_growth=1.5, m_period=3,
                       m_max=4)  # fmt: skip
    state = method.init(task.problem, task.x0, task.y0)
    ms, dims = [], []
    for _ in range(30):
        _, state = method.step(task.problem, task.x0, state)
        ms.append(state.info["m"])
        dims.append(state.info["subspace_dim"])
    assert ms[:9] == [1, 1, 2, 2, 2, 3, 3, 3, 4] and max(ms) == 4
    assert max(dims) == 4 and dims[:3] == [1, 1, 1]
    # m = 10·1.1 is 11 (not 12, as a bare ceil of the float product would give)
    method = bl.method("lancbio", m=10, m_growth=1.1, m_period=1, m_max=80)
    state = method.init(task.problem, task.x0, task.y0)
    _, state = method.step(task.problem, task.x0, state)
    assert state.m == 11


def test_bad_options_raise_clear_errors():
    for options, match in (
        ({"m": 0}, "m must be an integer >= 1"),
        ({"m": 5, "m_max": 3}, "m_max must be an integer >= 5"),
        ({"m_growth": 0.5}, "m_growth must be a number >= 1"),
        ({"m_period": 0}, "m_period"),
        ({"window": "yes"}, "window must be False"), ({"window": True}, "window=.sliding."),
        ({"fallback_lr": 0.0}, "fallback_lr"),
    ):
        with pytest.raises(ValueError, match=match):
            bl.method("lancbio", **options)
    with pytest.raises(TypeError, match="'solver_lr' is now 'fallback_lr'"):
        bl.method("lancbio", solver_lr=0.1)
    with pytest.raises(TypeError, match=r"has no option\(s\) m;"):
        bl.method("subbio", m=3)


def test_ldl_solve_matches_dense_and_flags_indefinite():
    gen = torch.Generator().manual_seed(0)
    diag = 4.0 + torch.rand(7, generator=gen, dtype=torch.float64)
    off = torch.rand(6, generator=gen, dtype=torch.float64)
    rhs = torch.randn(7, generator=gen, dtype=torch.float64)
    dense = torch.diag(diag) + torch.diag(off, 1) + torch.diag(off, -1)
    s, positive = linalg.tridiagonal_ldl_solve(diag, off, rhs)
    assert bool(positive) and torch.allclose(s, torch.linalg.solve(dense, rhs), atol=1e-13)
    s, positive = linalg.tridiagonal_ldl_solve(torch.tensor([1.0, -2.0]), torch.tensor([0.5]),
                                               torch.ones(2))  # fmt: skip
    assert not bool(positive) and bool(torch.isfinite(s).all())
    with pytest.raises(ValueError, match="need 1"):
        linalg.tridiagonal_ldl_solve(diag[:2], off[:3], rhs[:2])
    # the dense path of projected_solve agrees, flags alike
    for d, o in ((diag, off), (torch.tensor([1.0, -2.0]), torch.tensor([0.5]))):
        r = rhs[: len(d)].to(d.dtype)
        loop, loop_ok = linalg.tridiagonal_ldl_solve(d, o, r)
        dense, dense_ok = linalg.projected_solve(d, o, r)
        assert bool(loop_ok) == bool(dense_ok)
        if bool(loop_ok):
            assert torch.allclose(loop, dense, atol=1e-13)


def test_lancbio_resumes_from_a_checkpoint_bit_exact(tmp_path):
    task, _ = _quadratic()
    options = {"inner_steps": 2, "inner_lr": 1.0, "m": 3, "m_max": 3}
    run = dict(steps=8, outer_optimizer="sgd", outer_lr=0.1)
    full = bl.solve(task.problem, task.x0, task.y0, bl.method("lancbio", **options), **run)
    path = tmp_path / "ck.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bl.solve(task.problem, task.x0, task.y0, bl.method("lancbio", **options),
                 checkpoint=path, checkpoint_every=4, **{**run, "steps": 4})  # fmt: skip
        resumed = bl.solve(task.problem, task.x0, task.y0, bl.method("lancbio", **options),
                           checkpoint=path, checkpoint_every=4, **run)  # fmt: skip
    assert torch.equal(full.x["x"], resumed.x["x"])


# ------------------------------------------------------------------ scale-aware defaults
def _stiff_quadratic(n: int = 12, L: float = 200.0, seed: int = 0):
    """½yᵀAy − yᵀ(Bx + c), eigenvalues of A in [1, L] (2/L = 0.01 < 0.1), f = ½‖y − t‖²."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    A = q @ torch.diag(torch.linspace(1.0, L, n, dtype=torch.float64)) @ q.T
    B = torch.randn(n, 3, generator=g, dtype=torch.float64)
    c, t = (torch.randn(n, generator=g, dtype=torch.float64) for _ in range(2))
    problem = bl.Problem(
        upper=lambda x, y, _: 0.5 * torch.sum((y["y"] - t) ** 2),
        lower=lambda x, y, _: 0.5 * y["y"] @ (A @ y["y"]) - y["y"] @ (B @ x["x"] + c),
    )
    x = {"x": torch.randn(3, generator=g, dtype=torch.float64)}
    ys = torch.linalg.solve(A, B @ x["x"] + c)
    exact = B.T @ torch.linalg.solve(A, ys - t)
    return problem, x, {"y": torch.zeros(n, dtype=torch.float64)}, exact


def test_subbio_default_eta_converges_when_two_over_l_is_below_a_tenth():
    problem, x, y, exact = _stiff_quadratic()
    method = bl.method("subbio", inner_steps=5, inner_lr=1.0 / 200)  # η defaults to inner_lr
    hg = bl.hypergrad(problem, x, y, method, steps=3000)["x"]
    assert float((hg - exact).norm() / exact.norm()) < 1e-6
    with pytest.raises(ValueError, match="solver_lr"):
        bl.method("subbio", solver_lr=0.0)


def test_lancbio_on_minibatches_holds_one_batch_per_cycle_and_stays_bounded():
    """Measured: with a fresh batch per Lanczos step T projects no single matrix and v grows
    to ~1e4·‖v*‖ in 400 steps; holding the restart's batch for the cycle keeps it bounded.
    A held cycle solves one batch's system, so its error cannot beat the exact one-batch
    solves' (mean 0.37 here, against SOBA's 0.05: benchmarks/krylov/minibatch_quadratic.md);
    measured 0.49 over the last 100 of 400 steps, 11 with a batch per step."""

    def run(**options) -> tuple[float, float]:  # (largest ‖v‖/‖v*‖, mean error of the last 100)
        problem, x, y, v_star, exact = minibatch_quadratic()
        method = bl.method("lancbio", inner_steps=1, inner_lr=0.02, **options)
        state, largest, errors = method.init(problem, x, y), 0.0, []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for _ in range(400):
                hg, state = method.step(problem, x, state)
                largest = max(largest, float(state.v["y"].norm() / v_star.norm()))
                errors.append(float((hg["x"] - exact).norm() / exact.norm()))
        return largest, sum(errors[-100:]) / 100

    per_batch, _ = one_batch_floor()
    floor = sum(per_batch) / len(per_batch)
    held, held_error = run()  # the default with lower_data
    assert held < 3, held
    assert held_error < 1.5 * floor, (held_error, floor)
    fresh, fresh_error = run(hold_batch=False)
    assert fresh > 10 * held and fresh_error > 5 * floor, (fresh, fresh_error)


def test_an_anchor_worse_than_zero_is_dropped_at_the_restart():
    """A v̄ with ‖b − A v̄‖ > 10‖b‖ (what compounding mini-batch cycles produce) is not carried
    into the next cycle: the cycle starts from 0, so its first iterate is CG's first."""
    task, data = _quadratic(dim_y=30)
    b = _b(data, task.x0["x"], task.y0["y"])
    method = bl.method("lancbio", inner_steps=0, m=2, m_max=2)  # fixed system, cycles of 2
    state = method.init(task.problem, task.x0, task.y0)
    for _ in range(2):
        _, state = method.step(task.problem, task.x0, state)
    assert int(state.anchor_resets) == 0
    ab = data.A @ b
    state.v = {"y": 12 * b.norm() / ab.norm() * b}  # ‖b − A v̄‖ ≥ 11‖b‖
    _, state = method.step(task.problem, task.x0, state)  # step 3: a restart
    assert int(state.anchor_resets) == 1 and int(state.info["anchor_resets"]) == 1
    first_cg = (b @ b) / (b @ ab) * b
    assert torch.allclose(state.v["y"], first_cg, rtol=1e-12, atol=0)
    _, state = method.step(task.problem, task.x0, state)
    _, state = method.step(task.problem, task.x0, state)  # the next restart keeps a good anchor
    assert int(state.anchor_resets) == 1


# ------------------------------------------------------------------ the authors' variants
def test_authors_window_is_a_restarted_projection_with_at_most_m_minus_1_vectors():
    """Fixed system (inner_steps=0): each cycle of m steps starts from b (the previous step's,
    equal here) with no anchor, so at its j-th step (j < m) v is CG's j-th iterate from 0;
    at most m − 1 vectors; the first cycle starts from the authors' uniform vector instead."""
    task, data = _quadratic(dim_y=30)
    b = _b(data, task.x0["x"], task.y0["y"])
    m = 5
    method = bl.method("lancbio", inner_steps=0, m=m, m_max=m, window="authors")
    state = method.init(task.problem, task.x0, task.y0)
    dims = []
    for step in range(1, 4 * m + 1):
        _, state = method.step(task.problem, task.x0, state)
        dims.append(state.info["subspace_dim"])
        j = (step - 1) % m + 1
        if step > m and j < m:  # cycles after the first start from b; at j = m the window
            # has dropped the cycle's first vector (b's direction), as the authors' code does
            cg, _ = linalg.conjugate_gradient(
                lambda t: {"v": data.A @ t["v"]}, {"v": b}, None, j, tol=0.0
            )
            assert torch.allclose(state.v["y"], cg["v"], rtol=0, atol=1e-8 * float(cg["v"].norm()))
    assert max(dims) == m - 1 and dims[:m] == [1, 2, 3, 4, 4]


def test_modulo_restart_rule_matches_the_authors_synthetic_code():
    """m grows before 1-based step k ≡ period − 1 (mod period); restart when k mod m = 1 or
    m = 1 (written out here independently of the method)."""
    task, _ = _quadratic()
    options = {"m": 1, "m_growth": 1.5, "m_period": 4, "m_max": 5}
    method = bl.method("lancbio", inner_steps=1, inner_lr=1.0, restart_rule="modulo", **options)
    state = method.init(task.problem, task.x0, task.y0)
    m, expected, got = 1, [], []
    for k in range(1, 30):
        if k % 4 == 3:
            m = min(math.ceil(m * 1.5 - 1e-9), 5)
        expected.append(k == 1 or k % m == 1 or m == 1)
        before = state.restarts
        _, state = method.step(task.problem, task.x0, state)
        got.append(state.restarts > before)
    assert got == expected


def test_warmup_runs_the_authors_window_then_restarts_from_its_v():
    task, data = _quadratic(seed=3)
    method = bl.method("lancbio", inner_steps=5, inner_lr=1.0, fallback_lr=1.0, m=3, m_max=3,
                       warmup_steps=12, warmup_m_max=6, m_growth=2.0, m_period=4)  # fmt: skip
    state = method.init(task.problem, task.x0, task.y0)
    task.problem.counts.clear()
    for _ in range(12):
        _, state = method.step(task.problem, task.x0, state)
    assert task.problem.counts["hvp"] == 12  # windowed: no restart HVPs
    assert state.m == 6  # grown up to the warm-up cap
    _, state = method.step(task.problem, task.x0, state)
    assert task.problem.counts["hvp"] == 14 and state.m == 3  # restart HVP, cap m_max
    hg = bl.hypergrad(task.problem, task.x0, task.y0, method, steps=80)
    assert relative_error(hg, data.hypergradient(task.x0)) < 1e-6

import pytest
import torch

from bilevel import linalg
from bilevel.tasks.quadratic import random_spd


def _system(n=12, condition=50.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    A = random_spd(n, condition, gen, torch.float64, "cpu")
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    return A, {"v": b}, (lambda t: {"v": A @ t["v"]})


@pytest.mark.parametrize("host", [False, True])
def test_cg_solves_to_tolerance_and_reports(host):
    A, b, mv = _system()
    v, info = linalg.conjugate_gradient(mv, b, maxiter=100, tol=1e-12, host_scalars=host)
    exact = torch.linalg.solve(A, b["v"])
    assert torch.allclose(v["v"], exact, rtol=1e-9, atol=1e-11)
    assert info.iterations <= 12 + 2  # n-step termination in exact arithmetic
    assert float(info.residual) <= 1e-12 * float(b["v"].norm()) * 1.0001
    assert torch.allclose(info.residual, torch.linalg.norm(A @ v["v"] - b["v"]), atol=1e-10)


@pytest.mark.parametrize("host", [False, True])
def test_cg_without_tolerance_runs_exact_iterations_and_warm_start_helps(host):
    A, b, mv = _system()
    calls = []

    def counted(t):
        calls.append(1)
        return mv(t)

    v3, info = linalg.conjugate_gradient(counted, b, maxiter=3, tol=0.0, host_scalars=host)
    assert info.iterations == 3 and len(calls) == 3
    calls.clear()
    v6, info6 = linalg.conjugate_gradient(counted, b, v3, 3, 0.0, host_scalars=host)
    assert len(calls) == 4  # one extra matvec for the warm-start residual
    cold, info_cold = linalg.conjugate_gradient(mv, b, maxiter=3, tol=0.0, host_scalars=host)
    assert float(info6.residual) < float(info_cold.residual)


@pytest.mark.parametrize("host", [False, True])
def test_cg_warm_start_at_solution_stops_immediately(host):
    A, b, mv = _system()
    exact = {"v": torch.linalg.solve(A, b["v"])}
    _, info = linalg.conjugate_gradient(mv, b, exact, 50, 1e-8, host_scalars=host)
    assert info.iterations == 0


def _diagonal(values):
    diag = torch.tensor(values, dtype=torch.float64)
    return lambda t: {"v": diag * t["v"]}


@pytest.mark.parametrize(
    ("case", "matvec", "start"),
    [
        ("positive definite", _system()[2], None),
        ("positive definite, warm start kept", _system()[2], [0.1]),
        ("warm start dropped", _system()[2], [30.0]),
        ("negative curvature", _diagonal([2.0, 1.0, -1.0, 0.5] * 3), None),
        ("no progress: fallback", _diagonal([2.0, 1.0, -5.0, 0.3] * 3), None),
        ("grows: back to the warm start", _diagonal([1.0, -0.999] * 6), [0.0]),
        ("NaN product", lambda t: {"v": t["v"] * float("nan")}, None),
    ],
)
@pytest.mark.parametrize("fallback_lr", [None, 0.1])
def test_cg_with_host_scalars_takes_the_tensor_paths_steps(case, matvec, start, fallback_lr):
    # the same iterate, residual and guard counters whichever side keeps the scalars
    b = {"v": torch.ones(12, dtype=torch.float64)}
    x0 = None if start is None else {"v": torch.tensor(start * (12 // len(start))).double()}
    runs = [
        linalg.conjugate_gradient(matvec, b, x0, 8, 0.0, fallback_lr, host_scalars=host)
        for host in (False, True)
    ]
    (v, info), (v_host, info_host) = runs
    assert torch.allclose(v_host["v"], v["v"], rtol=1e-12, atol=1e-14, equal_nan=True), case
    assert torch.allclose(info_host.residual, info.residual, rtol=1e-12, equal_nan=True), case
    assert info_host.residual.dtype == info.residual.dtype and info_host.iterations == 8
    for key in ("negative_curvature", "restarts", "warm_start_dropped", "fallbacks"):
        assert isinstance(getattr(info_host, key), int), key
        assert getattr(info_host, key) == int(getattr(info, key)), (case, key)


def test_neumann_and_fixed_point_converge():
    A, b, mv = _system(condition=10.0)
    exact = torch.linalg.solve(A, b["v"])
    v, _ = linalg.neumann(mv, b, lr=1.0, terms=400)
    assert torch.allclose(v["v"], exact, rtol=1e-9, atol=1e-10)
    w, _ = linalg.fixed_point(mv, b, None, lr=1.0, iters=400)
    assert torch.allclose(w["v"], exact, rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="at least one term"):
        linalg.neumann(mv, b, lr=1.0, terms=0)


def test_lanczos_builds_orthonormal_basis_and_tridiagonal():
    A, b, mv = _system(n=10)
    q = {"v": b["v"] / b["v"].norm()}
    q_prev, beta = None, torch.zeros((), dtype=torch.float64)
    basis, alphas, betas = [q["v"]], [], []
    for _ in range(5):
        alpha, beta, q_next = linalg.lanczos_step(mv, q, q_prev, beta)
        alphas.append(alpha)
        betas.append(beta)
        q_prev, q = q, q_next
        basis.append(q["v"])
    Q = torch.stack(basis[:5], 1)
    assert torch.allclose(Q.T @ Q, torch.eye(5, dtype=torch.float64), atol=1e-10)
    T = Q.T @ A @ Q
    expected = torch.diag(torch.stack(alphas)) + torch.diag(torch.stack(betas[:4]), 1)
    expected = expected + torch.diag(torch.stack(betas[:4]), -1)
    assert torch.allclose(T, expected, atol=1e-10)


def test_lanczos_breakdown_gives_zero_vector():
    q = {"v": torch.tensor([1.0, 0.0], dtype=torch.float64)}
    alpha, beta, q_next = linalg.lanczos_step(lambda t: {"v": 3 * t["v"]}, q, None, torch.zeros(()))
    assert float(alpha) == 3.0 and float(beta) == 0.0
    assert torch.count_nonzero(q_next["v"]) == 0


def test_tridiagonal_solve_matches_dense():
    gen = torch.Generator().manual_seed(3)
    n = 7
    diag = 4 + torch.rand(n, generator=gen, dtype=torch.float64)
    off = torch.rand(n - 1, generator=gen, dtype=torch.float64)
    rhs = torch.randn(n, generator=gen, dtype=torch.float64)
    T = torch.diag(diag) + torch.diag(off, 1) + torch.diag(off, -1)
    s = linalg.tridiagonal_solve(diag, off, rhs)
    assert torch.allclose(s, torch.linalg.solve(T, rhs), atol=1e-12)
    one = linalg.tridiagonal_solve(diag[:1], off[:0], rhs[:1])
    assert torch.allclose(one, rhs[:1] / diag[:1])
    with pytest.raises(ValueError, match="singular"):
        linalg.tridiagonal_solve(torch.zeros(2), torch.ones(1), torch.ones(2))
    with pytest.raises(ValueError, match="off"):
        linalg.tridiagonal_solve(diag, off[:2], rhs)


def test_cg_on_singular_matrix_stays_finite():
    A = torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64))
    b = {"v": torch.tensor([-0.7, -0.3], dtype=torch.float64)}
    for k in (1, 5, 20):
        v, info = linalg.conjugate_gradient(lambda t: {"v": A @ t["v"]}, b, maxiter=k, tol=0.0)
        assert torch.isfinite(v["v"]).all() and torch.isfinite(info.residual)


def test_cg_consistent_singular_system_solved_in_range():
    A = torch.diag(torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64))
    b = {"v": torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)}
    v, _ = linalg.conjugate_gradient(lambda t: {"v": A @ t["v"]}, b, maxiter=10, tol=1e-12)
    assert torch.allclose(v["v"], torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64))

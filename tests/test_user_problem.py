"""Acceptance: a user-defined quadratic (multi-tensor trees, not the project's task) gets the
exact hypergradient from every method, the exact value computed here with dense matrices."""

import pytest
import torch
from torch.autograd.functional import hessian

import bilevel as bl

from helpers import relative_error

gen = torch.Generator().manual_seed(42)
P = torch.randn(6, 6, generator=gen, dtype=torch.float64)
A = P @ P.T / 6 + 0.5 * torch.eye(6, dtype=torch.float64)  # lower Hessian, SPD
A = A / torch.linalg.eigvalsh(A).max()
C = torch.randn(6, 5, generator=gen, dtype=torch.float64)
T = torch.randn(6, generator=gen, dtype=torch.float64)


def _vec_y(y):
    return torch.cat([y["U"].reshape(-1), y["w"]])


def _vec_x(x):
    return torch.cat([x["a"], x["B"].reshape(-1)])


def lower(x, y, batch):
    v = _vec_y(y)
    return 0.5 * v @ (A @ v) - v @ (C @ _vec_x(x)) + torch.sum(torch.sin(x["a"]))


def upper(x, y, batch):
    v = _vec_y(y)
    return 0.5 * torch.sum((v - T) ** 2) + 0.1 * torch.sum(_vec_x(x) ** 3)


X0 = {
    "a": torch.tensor([0.3, -0.2], dtype=torch.float64),
    "B": torch.tensor([[0.1, 0.4, -0.5]], dtype=torch.float64),
}
Y0 = {"U": torch.zeros(2, 2, dtype=torch.float64), "w": torch.zeros(2, dtype=torch.float64)}


def exact_hypergradient():
    xv = _vec_x(X0)
    ystar = torch.linalg.solve(A, C @ xv)

    def lower_flat(z):
        return 0.5 * z[5:] @ (A @ z[5:]) - z[5:] @ (C @ z[:5])

    H = hessian(lower_flat, torch.cat([xv, ystar]))
    gx = 0.3 * xv**2
    gy = ystar - T
    hg = gx - H[:5, 5:] @ torch.linalg.solve(H[5:, 5:], gy)
    return {"a": hg[:2], "B": hg[2:].reshape(1, 3)}


OPTIONS = {
    "itd": {"inner_steps": 600, "inner_lr": 1.0},
    "forward": {"inner_steps": 600, "inner_lr": 1.0},
    "cg": {"inner_steps": 600, "inner_lr": 1.0, "solver_iters": 50, "solver_tol": 1e-14},
    "neumann": {"inner_steps": 600, "inner_lr": 1.0, "solver_iters": 600, "solver_lr": 1.0},
    "fixed_point": {"inner_steps": 600, "inner_lr": 1.0, "solver_iters": 600, "solver_lr": 1.0},
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_user_defined_problem_exact(name):
    problem = bl.Problem(upper=upper, lower=lower)
    hg = bl.hypergrad(problem, X0, Y0, bl.method(name, **OPTIONS[name]))
    assert hg.keys() == X0.keys() and hg["B"].shape == (1, 3)
    assert relative_error(hg, exact_hypergradient()) < 1e-6


def test_registry_lists_the_baselines():
    assert {"itd", "forward", "cg", "neumann", "fixed_point"} <= set(bl.methods_available())

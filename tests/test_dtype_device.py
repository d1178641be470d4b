"""float32 works, and estimates keep the dtype and device of the variables."""

import pytest
import torch

import bilevel as bl
from bilevel.tasks import quadratic

from helpers import relative_error

OPTIONS = {
    "itd": {"inner_steps": 200, "inner_lr": 1.0},
    "forward": {"inner_steps": 200, "inner_lr": 1.0},
    "cg": {"inner_steps": 200, "inner_lr": 1.0, "solver_iters": 50, "solver_tol": 1e-6},
    "neumann": {"inner_steps": 200, "inner_lr": 1.0, "solver_iters": 200, "solver_lr": 1.0},
    "fixed_point": {"inner_steps": 200, "inner_lr": 1.0, "solver_iters": 200, "solver_lr": 1.0},
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_float32(name):
    task = quadratic(dim_x=4, dim_y=8, condition=10.0, seed=0, dtype=torch.float32)
    exact = task.metadata["data"].hypergradient(task.x0)
    state_holder = bl.method(name, **OPTIONS[name])
    hg = bl.hypergrad(task.problem, task.x0, task.y0, state_holder)
    assert hg["x"].dtype == torch.float32 and hg["x"].device == task.x0["x"].device
    assert relative_error(hg, exact) < 1e-4


devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_solve_keeps_dtype_and_device(name, device):
    task = quadratic(dim_x=3, dim_y=5, seed=1, dtype=torch.float32, device=device)
    result = bl.solve(task.problem, task.x0, task.y0, bl.method(name, inner_steps=5), steps=3)
    for tree in (result.x, result.y):
        for value in tree.values():
            assert value.dtype == torch.float32 and value.device.type == device

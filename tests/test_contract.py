"""The contract every registered method keeps (DESIGN: "Public API"), checked over
``bl.methods_available()`` so a new method is covered the day it is registered:

- float32 and float64 trees in, the same dtype and device out, finite;
- ``bl.solve`` with a checkpoint resumes bit-exactly;
- the oracle counts of a (warm) step are the ones its docstring states;
- ``step`` reads no number back to the host (``.item()``, ``bool()``, ``float()``) unless the
  method documents why (:data:`DOCUMENTED_SYNCS`; on the CPU, where a read is free,
  :data:`CPU_READS`).

Host reads are caught on any device by a ``TorchDispatchMode`` that sees
``aten._local_scalar_dense``, the op every tensor-to-Python-number conversion dispatches to.
``.tolist()`` and ``.numpy()`` of CPU tensors bypass the dispatcher, so on CPU they are not
seen; under CUDA the test also runs with ``torch.cuda.set_sync_debug_mode("error")``, which
catches them too.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bilevel as bl
from bilevel.linalg import conjugate_gradient
from bilevel.tasks import quadratic

K, J, Q, DIM_X, DIM_Y = 3, 4, 2, 3, 5

# small options per method: K inner steps, J solver products, Q directions; CG-type solves with
# solver_tol=0 (no convergence test, the documented way to avoid host syncs)
OPTIONS = {
    "cg": {"solver_iters": J, "solver_tol": 0.0},
    "amigo": {"solver_iters": J, "solver_tol": 0.0},
    "neumann": {"solver_iters": J},
    "fixed_point": {"solver_iters": J},
    "stocbio": {"solver_iters": J},
    "esj": {"directions": Q},
    "esj_s": {"directions": Q},
    "hozog": {"directions": Q},
    "sgld": {"seed": 0},
}

# counts of a second (warm-started) step, as each method's docstring states them
WARM_COUNTS = {
    "itd": {"lower_grad": K, "upper_grad": 1, "hvp": K, "mixed": K},
    "forward": {"lower_grad": K, "jvp": K * DIM_X, "upper_grad": 1},
    # +1 HVP: the warm start's residual
    "cg": {"lower_grad": K, "upper_grad": 1, "linearize": 1, "hvp": J + 1, "mixed": 1},
    "amigo": {"lower_grad": K, "upper_grad": 1, "linearize": 1, "hvp": J + 1, "mixed": 1},
    "neumann": {"lower_grad": K, "upper_grad": 1, "linearize": 1, "hvp": J, "mixed": 1},
    "fixed_point": {"lower_grad": K, "upper_grad": 1, "linearize": 1, "hvp": J, "mixed": 1},
    "stocbio": {"lower_grad": K, "upper_grad": 1, "linearize": 1, "hvp": J, "mixed": 1},
    # no restart yet
    "lancbio": {"lower_grad": K, "upper_grad": 1, "linearize": 1, "hvp": 1, "mixed": 1},
    "subbio": {"lower_grad": K, "upper_grad": 1, "linearize": 1, "hvp": 3, "mixed": 1},
    "soba": {"lower_grad": K, "upper_grad": 1, "linearize": 1, "hvp": 1, "mixed": 1},
    "esj": {"lower_grad": (Q + 1) * K, "upper_grad": 1},
    "esj_s": {"lower_grad": (Q + 1) * K, "upper_grad": 1},
    "hozog": {"lower_grad": (Q + 1) * K, "upper_eval": Q + 1},
    # harmonic weights are all non-zero: K upper gradients forward, 1 more for the estimate
    "bda": {"lower_grad": K, "upper_grad": K + 1, "hvp": K, "mixed": K, "upper_hvp": K,
            "upper_mixed": K},  # fmt: skip
    # forward estimator: one linearisation per used chain step gives the drift and both products
    "sgld": {"linearize": K, "upper_grad": K, "hvp": K, "mixed": K},
    "f2sa": {"lower_grad": 2 * K, "upper_grad": K + 1, "lower_grad_x": 2},
    "bome": {"lower_grad": K + 1, "upper_grad": 1, "lower_grad_x": 2},
    "direct": {"lower_grad": K, "upper_grad": 1},
}

# host reads a method's docstring documents, with the option that avoids them where one does
DOCUMENTED_SYNCS = {
    # LancBiO reads last step's breakdown flags (one .tolist()) to decide whether to restart:
    # the restart decides whether an HVP is spent, so it must be known on the host
    "lancbio": "restart decision",
}

# reads on the CPU only, where they cost nothing: CG keeps its scalars on the host there
# (‖b‖², the warm start's ‖r₀‖², then pᵀAp and ‖r‖² per iteration); on an accelerator it reads
# nothing, which test_cg_on_tensor_scalars_reads_nothing_back checks on the CPU
CPU_READS = {"cg": 2 + 2 * J, "amigo": 2 + 2 * J}

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _method(name: str, **extra) -> bl.Method:
    return bl.method(name, inner_steps=K, inner_lr=0.5, **{**OPTIONS.get(name, {}), **extra})


def _task(dtype=torch.float64, device="cpu"):
    return quadratic(dim_x=DIM_X, dim_y=DIM_Y, condition=4.0, seed=0, dtype=dtype, device=device)


class HostReads(TorchDispatchMode):
    """Counts tensor-to-Python-number conversions (``.item()``, ``bool()``, ``float()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_every_method_is_covered_here():
    assert set(bl.methods_available()) == set(WARM_COUNTS)
    classes = {bl.methods.method_class(n).__name__ for n in bl.methods_available()}
    assert classes <= set(bl.methods.__all__)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", bl.methods_available())
def test_dtype_and_device_are_kept(name, dtype, device):
    task = _task(dtype, device)
    method = _method(name)
    state = method.init(task.problem, task.x0, task.y0)
    for step in range(2):
        hg, state = bl.outer_step(task.problem, method, task.x0, state, step)
    for tree, like in ((hg, task.x0), (state.y, task.y0)):
        for k, v in tree.items():
            assert v.dtype == dtype and v.device.type == device, (k, v.dtype, v.device)
            assert v.shape == like[k].shape
            assert bool(torch.isfinite(v).all())


@pytest.mark.parametrize("name", bl.methods_available())
def test_resume_from_a_checkpoint_is_bit_exact(name, tmp_path):
    def run(steps, checkpoint=None):
        task = _task()
        return bl.solve(task.problem, task.x0, task.y0, _method(name), steps=steps,
                        checkpoint=checkpoint, checkpoint_every=2)  # fmt: skip

    full = run(4)
    path = tmp_path / "run.pt"
    run(2, path)  # an interrupted run: checkpoint at step 2
    resumed = run(4, path)
    assert torch.equal(full.x["x"], resumed.x["x"]), name
    assert all(torch.equal(full.y[k], resumed.y[k]) for k in full.y), name
    assert [r["oracles"] for r in full.history] == [r["oracles"] for r in resumed.history]


@pytest.mark.parametrize("name", bl.methods_available())
def test_warm_step_oracle_counts_are_the_documented_ones(name):
    task = _task()
    method = _method(name)
    state = method.init(task.problem, task.x0, task.y0)
    _, state = method.step(task.problem, task.x0, state)
    task.problem.counts.clear()
    method.step(task.problem, task.x0, state)
    assert dict(task.problem.counts) == WARM_COUNTS[name]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", bl.methods_available())
def test_step_reads_nothing_back_to_the_host(name, device):
    task = _task(device=device)
    method = _method(name)
    state = method.init(task.problem, task.x0, task.y0)
    _, state = method.step(task.problem, task.x0, state)  # first step: "auto" choices made
    reads = HostReads()
    with reads:
        method.step(task.problem, task.x0, state)
    expected = CPU_READS.get(name, 0) if device == "cpu" else 0
    assert reads.count == expected, f"{name}: {reads.count} host read(s) in step"
    if device == "cuda" and name not in DOCUMENTED_SYNCS:
        torch.cuda.set_sync_debug_mode("error")
        try:
            method.step(task.problem, task.x0, state)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("warm_start", [False, True])
def test_cg_on_tensor_scalars_reads_nothing_back(warm_start):
    # the path CG takes off the CPU, guards and fallback included, checked where CI runs
    gen = torch.Generator().manual_seed(0)
    diag = torch.randn(DIM_Y, generator=gen, dtype=torch.float64)  # indefinite
    b = {"v": torch.randn(DIM_Y, generator=gen, dtype=torch.float64)}
    x0 = {"v": torch.randn(DIM_Y, generator=gen, dtype=torch.float64)} if warm_start else None
    reads = HostReads()
    with reads:
        _, info = conjugate_gradient(lambda t: {"v": diag * t["v"]}, b, x0, J, 0.0, 0.1)
    assert reads.count == 0 and isinstance(info.negative_curvature, torch.Tensor)


def test_the_host_read_detector_sees_a_documented_sync():
    """CG with a tolerance tests ‖r‖ ≤ tol·‖b‖ on the host every iteration (documented)."""
    task = _task()
    method = bl.method("cg", inner_steps=K, inner_lr=0.5, solver_iters=J, solver_tol=1e-10)
    state = method.init(task.problem, task.x0, task.y0)
    reads = HostReads()
    with reads:
        method.step(task.problem, task.x0, state)
    assert reads.count >= J

"""The residual and step-info callbacks: exact values on a quadratic, honest oracle counts."""

import pytest
import torch

import bilevel as bl
from bilevel import tasks
from bilevel.diagnostics import linear_system_residual, step_info


def _exact_residual(data, x, y, v):
    b = data.H @ (y - data.t) + data.M @ x
    return float(torch.linalg.norm(data.A @ v - b)), float(torch.linalg.norm(b))


@pytest.mark.parametrize("name", ["cg", "fixed_point", "subbio", "lancbio", "soba", "amigo"])
def test_residual_matches_closed_form_for_every_method_with_v(name):
    if name not in bl.methods_available():
        pytest.skip(f"{name} not registered")
    task = tasks.quadratic(dim_x=3, dim_y=8, seed=2)
    data = task.metadata["data"]
    seen = []

    def record(ctx):
        seen.append(_exact_residual(data, ctx.hg_x["x"], ctx.state.y["y"], ctx.state.v["y"]))

    result = bl.solve(task.problem, task.x0, task.y0, bl.method(name, inner_steps=2), steps=4,
                      callbacks=[linear_system_residual(task.problem), record])  # fmt: skip
    for row, (residual, b_norm) in zip(result.history, seen, strict=True):
        assert row["residual"] == pytest.approx(residual, rel=1e-10, abs=1e-14)
        assert row["relative_residual"] == pytest.approx(residual / b_norm, rel=1e-10, abs=1e-14)


def test_residual_calls_are_counted_and_reported_or_left_uncounted():
    def run(counted):
        task = tasks.quadratic(dim_x=3, dim_y=8, seed=0)
        callback = linear_system_residual(task.problem, counted=counted)
        method = bl.method("lancbio", inner_steps=1, m=50, m_max=50)
        return bl.solve(task.problem, task.x0, task.y0, method, steps=5, callbacks=[callback])

    counted, uncounted = run(True).history, run(False).history
    for i, (a, b) in enumerate(zip(counted, uncounted, strict=True)):
        # the callback's calls show up in the next rows' counts, and the row says how many
        assert a["diagnostic_oracles"] == {"hvp": i, "upper_grad": i}
        assert a["oracles"]["hvp"] - i == b["oracles"]["hvp"] == a["step"]
        assert a["oracles"]["upper_grad"] - i == b["oracles"]["upper_grad"]
        assert "diagnostic_oracles" not in b and a["residual"] == b["residual"]


def test_methods_without_v_log_nothing_and_step_info_copies_numbers():
    task = tasks.quadratic(dim_x=3, dim_y=8, seed=0)
    callbacks = [linear_system_residual(task.problem), step_info]
    itd = bl.solve(task.problem, task.x0, task.y0, "itd", steps=2, callbacks=callbacks)
    assert "residual" not in itd.history[-1]
    lanc = bl.solve(task.problem, task.x0, task.y0, bl.method("lancbio", m=2, m_max=2), steps=5,
                    callbacks=callbacks)  # fmt: skip
    row = lanc.history[-1]
    assert row["info_restarts"] == 3.0 and row["info_subspace_dim"] == 1.0
    assert row["info_breakdowns"] == 0.0 and row["info_indefinite"] == 0.0


def test_task_option_adds_the_diagnostics():
    task = tasks.make("krylov_synthetic", n=40, kappa=100.0, diagnostics=True)
    result = bl.solve(task.problem, task.x0, task.y0,
                      bl.method("lancbio", **task.method_options("lancbio")), steps=3,
                      callbacks=task.callbacks)  # fmt: skip
    row = result.history[-1]
    assert row["residual"] > 0 and "info_m" in row and "upper_value" in row
    plain = tasks.make("krylov_synthetic", n=40, kappa=100.0)
    assert len(plain.callbacks) == len(task.callbacks) - 2

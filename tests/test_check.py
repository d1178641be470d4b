"""bl.check on a user's own problem, `bilevel check`, and `bilevel run --import`."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import bilevel as bl
from bilevel.cli import main


def _mlp_problem(per: str = "tensor"):
    """An MLP regression as the inner problem, one L2 log-weight per parameter tensor (or per
    weight) as x; float64 throughout, full batch."""
    gen = torch.Generator().manual_seed(0)
    X, X_val = (torch.randn(40, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    t, t_val = torch.sin(X.sum(1)), torch.sin(X_val.sum(1))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    apply = bl.functional(model)

    def lower(x, y, batch):
        fit = torch.mean((apply(y, X).squeeze(1) - t) ** 2)
        return fit + sum(torch.sum(x[k].exp() * y[k] ** 2) for k in x)

    def upper(x, y, batch):
        return torch.mean((apply(y, X_val).squeeze(1) - t_val) ** 2)

    x = bl.hyperparameters(model, per=per, value=-3.0)
    return bl.Problem(upper=upper, lower=lower), x, bl.params(model)


def test_itd_and_forward_agree_with_finite_differences_on_an_mlp():
    problem, x, y = _mlp_problem()
    report = bl.check(problem, x, y, methods=["itd", "forward"], inner_steps=30, inner_lr=0.2)
    assert report.passed, str(report)
    assert report["itd"].error < 1e-7 and report["forward"].error < 1e-7
    assert report.agreement[("itd", "forward")] < 1e-10
    assert "every coordinate of x (4)" in report.reference
    text = str(report)
    assert "| itd" in text and "pass" in text and "all pass" in text


def test_wrong_options_are_flagged():
    problem, x, y = _mlp_problem()
    report = bl.check(
        problem,
        x,
        y,
        methods={
            "itd": "itd",
            "itd_truncated": bl.method("itd", inner_steps=30, inner_lr=0.2, truncate=1),
            "itd_other_lr": bl.method("itd", inner_steps=30, inner_lr=0.05),
        },
        inner_steps=30,
        inner_lr=0.2,
    )
    assert report["itd"].passed
    assert not report["itd_truncated"].passed and not report["itd_other_lr"].passed
    assert not report.passed and "FAIL" in str(report)


def test_random_directions_for_a_large_x_and_a_method_that_raises():
    problem, x, y = _mlp_problem(per="weight")  # 31 hyperparameters: random directions
    report = bl.check(
        problem,
        x,
        y,
        methods={"itd": "itd", "diverges": bl.method("itd", inner_steps=30, inner_lr=1e6)},
        inner_steps=30,
        inner_lr=0.2,
        directions=4,
    )
    assert "4 random directions" in report.reference
    assert report["itd"].passed, str(report)
    assert not report["diverges"].passed and "raised" in report["diverges"].failure


def test_cg_on_a_converged_inner_problem_passes_with_its_own_tolerance():
    problem, x, y = _mlp_problem()
    report = bl.check(
        problem,
        x,
        y,
        methods={"cg": bl.method("cg", inner_steps=800, inner_lr=0.5, solver_iters=100)},
        inner_steps=800,
        inner_lr=0.5,
        tol={"cg": 1e-4},
    )
    assert report["cg"].passed, str(report)


def test_bad_input():
    problem, x, y = _mlp_problem()
    stochastic = bl.Problem(upper=problem.upper, lower=problem.lower, lower_data=[None])
    with pytest.raises(ValueError, match="deterministic problem"):
        bl.check(stochastic, x, y)
    with pytest.raises(ValueError, match="given twice"):
        bl.check(problem, x, y, methods=["itd", "itd"])
    with pytest.raises(TypeError, match="names or Method instances"):
        bl.check(problem, x, y, methods=[3])


def test_bilevel_check_shows_a_verdict_and_tolerance_for_every_method(capsys):
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    for name in bl.methods_available():
        row = next(line for line in out.splitlines() if line.startswith(f"| {name} "))
        assert "| pass " in row, row
    assert "tolerance" in out and "all pass" in out


def test_run_import_runs_a_task_defined_outside_the_package(tmp_path):
    module = tmp_path / "my_tasks.py"
    module.write_text(
        textwrap.dedent(
            """
            import torch
            import bilevel as bl
            from bilevel.tasks import Task, register_task


            @register_task("my_ridge")
            def my_ridge(seed: int = 0):
                '''A user's one-dimensional ridge problem.'''
                problem = bl.Problem(
                    upper=lambda x, y, b: (y["w"] - 1.0) ** 2,
                    lower=lambda x, y, b: (y["w"] - 2.0) ** 2 + x["l"].exp() * y["w"] ** 2,
                )
                zero = torch.zeros((), dtype=torch.float64)
                return Task(name="my_ridge", problem=problem, x0={"l": zero.clone()},
                            y0={"w": zero.clone()}, solve_defaults={"steps": 3})
            """
        )
    )
    env_path = str(Path(__file__).parents[1])
    for spec, cwd in ((str(module), None), ("my_tasks", tmp_path)):
        out = tmp_path / f"run-{spec.replace('/', '_')}"
        done = subprocess.run(
            [sys.executable, "-m", "bilevel.cli", "run", "my_ridge", "--method", "cg",
             "--import", spec, "--out", str(out), "--quiet"],
            capture_output=True, text=True, timeout=300, cwd=cwd,
            env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert (out / "metrics.jsonl").read_text().count("\n") == 3
    done = subprocess.run(
        [sys.executable, "-m", "bilevel.cli", "run", "my_ridge", "--method", "cg",
         "--import", "no_such_module_here", "--out", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 2 and "--import no_such_module_here" in done.stderr

"""bl.solve with torch.optim instances, partials and schedulers; a killed run resumes exactly."""

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import bilevel as bl
from bilevel.tasks import quadratic

# a problem whose hyperparameters live in an nn.Module, mini-batched inner data (so resuming
# must restore the batch positions), Adam + StepLR; shared with the subprocess below
SETUP = textwrap.dedent(
    """
    import torch
    from torch import nn

    import bilevel as bl

    torch.manual_seed(0)
    X, X_val = torch.randn(60, 5, dtype=torch.float64), torch.randn(30, 5, dtype=torch.float64)
    t, t_val = X @ torch.ones(5, dtype=torch.float64), X_val @ torch.ones(5, dtype=torch.float64)
    batches = [(X[i : i + 20], t[i : i + 20]) for i in range(0, 60, 20)]


    class Hyper(nn.Module):
        def __init__(self):
            super().__init__()
            self.log_l2 = nn.Parameter(torch.zeros(5, dtype=torch.float64))


    def lower(x, y, batch):
        a, b = batch
        return torch.mean((a @ y["w"] - b) ** 2) + torch.sum(x["log_l2"].exp() * y["w"] ** 2)


    def upper(x, y, batch):
        return torch.mean((X_val @ y["w"] - t_val) ** 2)


    def run(steps, checkpoint=None, callbacks=()):
        hyper = Hyper()
        optimizer = torch.optim.Adam(hyper.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        problem = bl.Problem(upper=upper, lower=lower, lower_data=batches)
        result = bl.solve(
            problem,
            dict(hyper.named_parameters()),
            {"w": torch.zeros(5, dtype=torch.float64)},
            bl.method("cg", inner_steps=4, inner_lr=0.2, inner_optimizer="momentum"),
            steps=steps,
            outer_optimizer=optimizer,
            scheduler=scheduler,
            checkpoint=checkpoint,
            checkpoint_every=2,
            callbacks=callbacks,
        )
        return hyper, optimizer, result
    """
)
exec(compile(SETUP, "SETUP", "exec"))  # noqa: S102 - the same code the subprocess runs


def test_instance_updates_the_module_in_place_and_the_scheduler_decays_the_lr():
    seen = []
    hyper, optimizer, result = run(  # noqa: F821 - defined by SETUP
        7, callbacks=[lambda ctx: seen.append(ctx.optimizer.param_groups[0]["lr"])]
    )
    param = hyper.log_l2
    assert not torch.equal(param.detach(), torch.zeros(5, dtype=torch.float64))
    assert optimizer.param_groups[0]["params"][0] is param  # the module's own tensor
    torch.testing.assert_close(result.x["log_l2"], param.detach(), rtol=0, atol=0)
    # StepLR(step_size=3, gamma=0.5) stepped once per outer step
    assert seen == [0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025]
    assert bool((param < 0).all())  # noiseless targets: the outer step lowers the penalty


def test_instance_must_hold_exactly_the_tensors_of_x():
    task = quadratic(dim_x=3, dim_y=4)
    other = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="exactly the tensors of x"):
        bl.solve(task.problem, task.x0, task.y0, "cg", steps=1,
                 outer_optimizer=torch.optim.SGD([other], lr=0.1))  # fmt: skip
    x = {"x": task.x0["x"].clone().requires_grad_()}
    with pytest.raises(ValueError, match="an optimizer instance has its own lr"):
        bl.solve(task.problem, x, task.y0, "cg", steps=1, outer_lr=0.1,
                 outer_optimizer=torch.optim.SGD(x.values(), lr=0.1))  # fmt: skip
    elsewhere = torch.optim.SGD([other], lr=0.1)
    with pytest.raises(ValueError, match="scheduler steps another optimizer"):
        bl.solve(task.problem, x, task.y0, "cg", steps=1,
                 outer_optimizer=torch.optim.SGD(x.values(), lr=0.1),
                 scheduler=torch.optim.lr_scheduler.StepLR(elsewhere, 2))  # fmt: skip


def _optimizer_seen(spec, **solve_options):
    task = quadratic(dim_x=3, dim_y=4)
    seen = []
    bl.solve(task.problem, task.x0, task.y0, "cg", steps=2, outer_optimizer=spec,
             callbacks=[lambda ctx: seen.append(ctx.optimizer)], **solve_options)  # fmt: skip
    return seen[-1].param_groups[0]


def test_classes_and_partials_and_the_adamw_weight_decay_trap():
    assert _optimizer_seen("adam")["lr"] == 0.05  # the documented default outer_lr
    # a bare class never applies a weight decay nobody asked for (AdamW's default is 0.01)
    assert _optimizer_seen(torch.optim.AdamW)["weight_decay"] == 0.0
    decayed = _optimizer_seen(functools.partial(torch.optim.AdamW, weight_decay=0.01), outer_lr=0.2)
    assert decayed["weight_decay"] == 0.01 and decayed["lr"] == 0.2
    assert _optimizer_seen(functools.partial(torch.optim.SGD, lr=0.3, momentum=0.9))["lr"] == 0.3
    with pytest.raises(ValueError, match="outer_lr given twice"):
        _optimizer_seen(functools.partial(torch.optim.SGD, lr=0.3), outer_lr=0.1)
    with pytest.raises(TypeError, match="outer_optimizer must be"):
        _optimizer_seen(functools.partial(dict))
    # a scheduler given as a callable optimizer -> scheduler works with names too
    group = _optimizer_seen("sgd", scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, 0.5))
    assert group["lr"] == 0.05 * 0.25


def test_a_killed_run_resumes_bit_exactly(tmp_path):
    """SIGKILL in the middle of step 5 (after the checkpoint at 4); the rerun resumes from the
    file; x, the module, the Adam moments and the scheduler equal an uninterrupted run's."""
    script = tmp_path / "job.py"
    script.write_text(
        SETUP
        + textwrap.dedent(
            """
            import os, signal, sys
            torch.set_num_threads(1)
            mode, path, out = sys.argv[1], sys.argv[2], sys.argv[3]
            if mode == "kill":
                def die(ctx):
                    if ctx.step == 5:
                        os.kill(os.getpid(), signal.SIGKILL)
                run(8, checkpoint=path, callbacks=[die])
            else:
                resumed, opt_r, res_r = run(8, checkpoint=path)
                full, opt_f, res_f = run(8)
                torch.save({"resumed": [resumed.state_dict(), opt_r.state_dict(), res_r.y],
                            "full": [full.state_dict(), opt_f.state_dict(), res_f.y],
                            "steps": [r["step"] for r in res_r.history]}, out)
            """
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).parents[1])}  # fmt: skip
    ckpt, out = tmp_path / "run.pt", tmp_path / "out.pt"
    killed = subprocess.run([sys.executable, str(script), "kill", str(ckpt), str(out)], env=env)
    assert killed.returncode == -9 and ckpt.exists()
    subprocess.run([sys.executable, str(script), "resume", str(ckpt), str(out)], env=env,
                   check=True)  # fmt: skip
    saved = torch.load(out, weights_only=True)
    assert saved["steps"] == list(range(1, 9))
    (module_r, opt_r, y_r), (module_f, opt_f, y_f) = saved["resumed"], saved["full"]
    assert torch.equal(module_r["log_l2"], module_f["log_l2"])
    assert torch.equal(y_r["w"], y_f["w"])
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opt_r["state"][0][key], opt_f["state"][0][key])
    assert opt_r["param_groups"][0]["lr"] == opt_f["param_groups"][0]["lr"] == 0.1 * 0.5**2


def test_inner_state_keep_carries_the_inner_momentum():
    task = quadratic(dim_x=3, dim_y=6, seed=0)
    kept = bl.method("cg", inner_steps=3, inner_lr=0.3, inner_optimizer="momentum",
                     inner_state="keep")  # fmt: skip
    reset = bl.method("cg", inner_steps=3, inner_lr=0.3, inner_optimizer="momentum")
    state_k = kept.init(task.problem, task.x0, task.y0)
    state_r = reset.init(task.problem, task.x0, task.y0)
    for _ in range(2):
        _, state_k = bl.outer_step(task.problem, kept, task.x0, state_k, 0)
        _, state_r = bl.outer_step(task.problem, reset, task.x0, state_r, 0)
    assert state_r.inner_optimizer_state is None and state_k.inner_optimizer_state is not None
    assert not torch.equal(state_k.y["y"], state_r.y["y"])
    # the same 6 momentum steps in one run from y0 are what "keep" did across two outer steps
    once = bl.method("cg", inner_steps=6, inner_lr=0.3, inner_optimizer="momentum")
    _, state_once = bl.outer_step(task.problem, once, task.x0,
                                  once.init(task.problem, task.x0, task.y0), 0)  # fmt: skip
    torch.testing.assert_close(state_k.y["y"], state_once.y["y"], rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="inner_state='keep' is not supported"):
        bl.method("itd", inner_state="keep")
    with pytest.raises(ValueError, match="needs warm_start=True"):
        bl.method("cg", inner_state="keep", warm_start=False)


@pytest.mark.parametrize("inner_optimizer", ["momentum", "adam"])
def test_kept_inner_state_resumes_bit_exactly(tmp_path, inner_optimizer):
    def run(steps, checkpoint=None):
        task = quadratic(dim_x=3, dim_y=6, seed=0)
        method = bl.method("cg", inner_steps=3, inner_lr=0.1, inner_optimizer=inner_optimizer,
                           inner_state="keep")  # fmt: skip
        return bl.solve(task.problem, task.x0, task.y0, method, steps=steps,
                        checkpoint=checkpoint, checkpoint_every=2)  # fmt: skip

    full = run(5)
    run(2, tmp_path / "c.pt")
    resumed = run(5, tmp_path / "c.pt")
    assert torch.equal(full.x["x"], resumed.x["x"]) and torch.equal(full.y["y"], resumed.y["y"])


def test_outer_step_draws_the_task_and_raises_on_nan():
    problem = bl.Problem(
        upper=lambda x, y, b: torch.sum((y["y"] - b) ** 2),
        lower=lambda x, y, b: torch.sum((y["y"] - x["x"]) ** 2 * torch.log(b - 1)),  # log 0
        task_data=[torch.ones(2, dtype=torch.float64)],
    )
    x, y = {"x": torch.zeros(2, dtype=torch.float64)}, {"y": torch.zeros(2, dtype=torch.float64)}
    method = bl.method("cg", inner_steps=1)
    state = method.init(problem, x, y)
    with pytest.raises(bl.NonFiniteError, match="outer step 3"):
        bl.outer_step(problem, method, x, state, 3)
    assert problem.batches_drawn["task"] == 1

"""Meta-learning shape: one task batch per outer step, shared by both losses; y may start at a
function of x (init_lower)."""

import torch

import bilevel as bl

from helpers import finite_difference, relative_error

TARGETS = [torch.tensor([float(i), -1.0, 0.5 * i], dtype=torch.float64) for i in range(4)]


def _problem(seen=None):
    def lower(x, y, task):
        if seen is not None:
            seen.append(("lower", int(task[0])))
        return 0.5 * torch.sum((y["w"] - task) ** 2) + 0.1 * torch.sum(y["w"] ** 4)

    def upper(x, y, task):
        if seen is not None:
            seen.append(("upper", int(task[0])))
        return torch.sum((y["w"] - 2 * task) ** 2)

    return bl.Problem(
        upper=upper, lower=lower, task_data=TARGETS, init_lower=lambda x: {"w": x["w0"] * 1.0}
    )


def test_one_task_per_outer_step_shared_by_both_losses():
    seen = []
    problem = _problem(seen)
    x = {"w0": torch.zeros(3, dtype=torch.float64)}
    bl.solve(problem, x, None, bl.method("itd", inner_steps=3, inner_lr=0.5), steps=6)
    assert problem.batches_drawn["task"] == 6
    # after validation's peek, every oracle of step s sees task s mod 4 (lower and upper alike)
    step_tasks = [t for _, t in seen[2:]]
    per_step = len(step_tasks) // 6
    for s in range(6):
        assert set(step_tasks[s * per_step : (s + 1) * per_step]) == {s % 4}


def test_maml_itd_matches_finite_differences_through_init_lower():
    problem = _problem()
    x = {"w0": torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)}
    problem.next_task()
    task = problem.current_task
    hg = bl.method("itd", inner_steps=4, inner_lr=0.3).step(
        problem, x, bl.method("itd").init(problem, x, None)
    )[0]

    def value(x_):
        y = {"w": x_["w0"].clone().requires_grad_(True)}
        for _ in range(4):
            (g,) = torch.autograd.grad(problem.lower(x_, y, task), [y["w"]])
            y = {"w": (y["w"] - 0.3 * g).detach().requires_grad_(True)}
        return problem.upper(x_, y, task).detach()

    assert relative_error(hg, finite_difference(value, x)) < 1e-6


def test_resume_replays_task_stream(tmp_path):
    x = {"w0": torch.zeros(3, dtype=torch.float64)}
    m = bl.method("itd", inner_steps=2, inner_lr=0.5)
    full = bl.solve(_problem(), x, None, m, steps=7, outer_lr=0.1)
    path = tmp_path / "ck.pt"
    bl.solve(_problem(), x, None, m, steps=5, outer_lr=0.1, checkpoint=path, checkpoint_every=5)
    resumed = bl.solve(_problem(), x, None, m, steps=7, outer_lr=0.1, checkpoint=path)
    assert torch.equal(full.x["w0"], resumed.x["w0"])

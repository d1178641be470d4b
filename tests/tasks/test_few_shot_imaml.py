"""few_shot's iMAML preset (MAML form + λ/2‖y − x‖²): cg's hypergradient equals finite
differences of F(x) = f(x, y*(x)) in float64, on a tiny conv-4 and 16×16 images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.func import grad

import bilevel as bl
from bilevel.tasks.few_shot import few_shot

from helpers import stroke_glyphs

# BatchNorm over a 4-image support set makes the CE's Hessian at x span about [−39, 43] (156
# weights), and with a small λ the minimiser sits on a ReLU/max-pool kink (GD and Newton both
# chatter there). λ = 500 keeps y* within ~0.01 of x, where the loss is smooth, and makes the
# lower problem well conditioned (Hessian in [461, 543]): GD of step 1/600 contracts by ~0.2
# per step, so 60 steps reach y*(x) to machine precision (checked below)
PROXIMAL = 500.0
INNER = {"inner_steps": 60, "inner_lr": 1 / 600}
TINY = {"n_way": 2, "k_shot": 2, "n_query": 2, "meta_batch": 1, "hidden": 2, "image_size": 16,
        "split_sizes": (1, 1, 1), "eval_episodes": 2}  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 alphabets x 2 characters x 4 drawings of random strokes (ink 0 on 255)."""
    root = tmp_path_factory.mktemp("omniglot")
    return stroke_glyphs(root, 3, 2, 4, size=16, strokes=2, span=(2, 14), jitter=0.5)


def _lower_solution(problem: bl.Problem, x: dict, batch) -> dict:
    """y*(x) by plain GD from init_lower(x), to a gradient norm of 1e-11 or less."""
    y = problem.init_lower(x)
    step = lambda y_: grad(lambda w: problem.lower(x, w, batch))(y_)  # noqa: E731
    for _ in range(INNER["inner_steps"]):
        y = bl.tree.axpy(-INNER["inner_lr"], step(y), y)
    assert float(bl.tree.norm(step(y))) < 1e-11
    return y


def test_imaml_cg_matches_finite_differences_of_its_objective(root: Path) -> None:
    task = few_shot(root=root, form="maml", proximal=PROXIMAL, dtype=torch.float64, **TINY)
    problem, x = task.problem, bl.tree.detach(task.x0)
    method = bl.method("cg", **INNER, solver_iters=200, solver_tol=1e-14)
    state = method.init(problem, x, None)
    problem.next_task()
    batch = problem.current_task
    hg, _ = method.step(problem, x, state)

    def objective(point: dict) -> float:
        return float(problem.upper(point, _lower_solution(problem, point, batch), batch))

    gen = torch.Generator().manual_seed(0)
    eps = 1e-5
    for _ in range(2):
        d = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in x.items()}
        fd = (objective(bl.tree.axpy(eps, d, x)) - objective(bl.tree.axpy(-eps, d, x))) / (2 * eps)
        directional = float(bl.tree.dot(hg, d))
        assert abs(directional - fd) <= 1e-6 * abs(fd) and abs(fd) > 1e-6


def test_maml_form_without_the_proximal_term_gets_the_explanatory_error(root: Path) -> None:
    task = few_shot(root=root, form="maml", **TINY)
    with pytest.raises(ValueError, match=r"does not depend on x.*init_lower.*itd.*proximal"):
        bl.hypergrad(task.problem, task.x0, None, bl.method("cg"))


def test_proximal_needs_the_maml_form(root: Path) -> None:
    with pytest.raises(ValueError, match="needs form='maml'"):
        few_shot(root=root, form="feature", proximal=1.0, **TINY)
    task = few_shot(root=root, form="maml", proximal=2.0, **TINY)
    assert task.method_options("cg") == {"inner_steps": 10, "inner_lr": 0.4, "solver_iters": 5}

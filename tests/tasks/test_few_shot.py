"""The few_shot task on a tiny Omniglot-layout folder of PNGs written here (and, if fonts are
installed, on a tiny generated glyph set)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import bilevel as bl
from bilevel.data.glyphs import FONT_PACKAGES, discover_fonts
from bilevel.tasks.few_shot import evaluate, few_shot

from helpers import relative_error, stroke_glyphs

TINY = {"n_way": 3, "k_shot": 2, "n_query": 2, "meta_batch": 2, "hidden": 4, "eval_episodes": 4}
TINY["image_size"] = 16  # conv-4 minimum: keeps the tests fast


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 alphabets x 6 characters x 6 drawings: each character is a random set of strokes,
    each drawing a jittered copy of them (ink 0 on 255, as Omniglot)."""
    root = tmp_path_factory.mktemp("omniglot")
    return stroke_glyphs(root, 6, 6, 6, size=28, strokes=3, span=(4, 24), jitter=1.0)


def _task(root: Path, **options) -> bl.tasks.Task:
    return few_shot(root=root, **{**TINY, **options})


def test_shapes_and_disjoint_splits(root: Path) -> None:
    task = _task(root)
    assert task.metadata["classes"] == {"train": 24, "val": 6, "test": 6}
    alphabets = task.metadata["alphabets"]
    assert not set(alphabets["train"]) & (set(alphabets["val"]) | set(alphabets["test"]))
    batch = next(iter(task.problem.task_data))
    assert batch.support_x.shape == (2, 6, 1, 16, 16) and batch.query_x.shape == (2, 6, 1, 16, 16)
    assert batch.support_y.tolist() == [[0, 0, 1, 1, 2, 2]] * 2
    y0 = task.problem.init_lower(task.x0)
    assert y0["weight"].shape == (2, 3, 4) and y0["bias"].shape == (2, 3)
    assert all(float(v.abs().sum()) == 0 for v in y0.values())
    maml = _task(root, form="maml")
    y0 = maml.problem.init_lower(maml.x0)
    assert y0.keys() == maml.x0.keys()
    assert all(
        torch.equal(y0[k][1], v) and y0[k].shape == (2, *v.shape) for k, v in maml.x0.items()
    )


def test_task_stream_is_deterministic_and_restarts(root: Path) -> None:
    def first(task: bl.tasks.Task, n: int = 3) -> list[torch.Tensor]:
        stream = iter(task.problem.task_data)
        return [next(stream).support_x for _ in range(n)]

    task = _task(root)
    a, b = first(task), first(task)  # a second iter() replays from the seed
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a[0], a[1])
    assert all(torch.equal(u, v) for u, v in zip(a, first(_task(root)), strict=True))
    assert not torch.equal(a[0], first(_task(root, seed=1))[0])


@pytest.mark.parametrize("form", ["feature", "maml"])
def test_hypergradient_is_finite_with_the_structure_of_x(root: Path, form: str) -> None:
    task = _task(root, form=form)
    hg = bl.hypergrad(task.problem, task.x0, task.y0, bl.method("itd", inner_steps=2))
    assert hg.keys() == task.x0.keys()
    for k, v in hg.items():
        assert v.shape == task.x0[k].shape and bool(torch.isfinite(v).all())
    assert float(sum(v.abs().sum() for v in hg.values())) > 0


def test_feature_form_itd_matches_forward_mode(root: Path) -> None:
    task = _task(root, hidden=2, dtype=torch.float64)
    options = {"inner_steps": 3, "inner_lr": 0.1}
    itd = bl.hypergrad(task.problem, task.x0, None, bl.method("itd", **options))
    task = _task(root, hidden=2, dtype=torch.float64)  # a fresh stream: the same task batch
    fwd = bl.hypergrad(task.problem, task.x0, None, bl.method("forward", **options))
    assert relative_error(itd, fwd) < 1e-8


@pytest.mark.parametrize("form", ["feature", "maml"])
def test_solve_logs_val_accuracy_and_evaluate_gives_an_interval(root: Path, form: str) -> None:
    task = _task(root, form=form)
    method = bl.method("itd", **task.method_options("itd"))
    result = bl.solve(task.problem, task.x0, None, method, steps=2, callbacks=task.callbacks)
    assert 0 <= result.history[-1]["val_accuracy"] <= 100
    mean, ci = evaluate(task, result.x, episodes=6)
    assert 0 <= mean <= 100 and ci > 0
    assert evaluate(task, result.x, episodes=6) == (mean, ci)  # seeded episodes


def test_default_data_is_the_glyph_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not discover_fonts():
        pytest.skip(f"no usable fonts installed (apt-get install {FONT_PACKAGES})")
    monkeypatch.setenv("BILEVEL_CACHE", str(tmp_path))
    task = few_shot(n_alphabets=5, n_characters=6, n_drawings=4, split_sizes=(3, 1, 1), **TINY)
    assert task.metadata["classes"] == {"train": 18, "val": 6, "test": 6}
    assert Path(task.metadata["root"]).parent == tmp_path
    hg = bl.hypergrad(task.problem, task.x0, None, bl.method("itd", inner_steps=1))
    assert all(bool(torch.isfinite(v).all()) for v in hg.values())

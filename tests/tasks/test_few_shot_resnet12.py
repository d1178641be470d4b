"""few_shot with the ResNet-12 backbone: the size of the full network, its shapes, and the
hypergradients of each method family through it (narrow widths, 16x16 images, 2-way 1-shot, so
the tests run on a CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.func import grad

import bilevel as bl
from bilevel import tree as tr
from bilevel.tasks.few_shot import few_shot
from bilevel.tasks.resnet12 import WIDTHS, resnet12

NARROW = (3, 4, 5, 6)
TINY = {
    "backbone": "resnet12",
    "widths": NARROW,
    "n_way": 2,
    "k_shot": 1,
    "n_query": 1,
    "meta_batch": 2,
    "image_size": 16,
    "split_sizes": (2, 1, 1),
    "eval_episodes": 2,
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 alphabets x 2 characters x 2 drawings: each character a random blot, each drawing a
    copy with 5% of its pixels flipped (ink 0 on 255, as Omniglot)."""
    root = tmp_path_factory.mktemp("omniglot")
    rng = np.random.default_rng(0)
    for a in range(4):
        for c in range(2):
            blot = rng.random((16, 16)) < 0.3
            folder = root / f"Alphabet_{a}" / f"character{c + 1:02d}"
            folder.mkdir(parents=True)
            for k in range(2):
                ink = blot ^ (rng.random((16, 16)) < 0.05)
                pixels = np.where(ink, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{k + 1:02d}.png")
    return root


def _task(root: Path, **options) -> bl.tasks.Task:
    return few_shot(root=root, **{**TINY, **options})


def expected_parameters(in_channels: int, widths: tuple[int, ...]) -> int:
    """Per block: three 3x3 convolutions and the 1x1 shortcut (no biases), four BatchNorms
    (a scale and a shift per channel)."""
    total = 0
    for c_in, c_out in zip((in_channels, *widths[:-1]), widths, strict=True):
        total += 9 * c_in * c_out + 2 * 9 * c_out * c_out + c_in * c_out + 4 * 2 * c_out
    return total


def _count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_full_size_network_has_the_literature_s_12_4m_parameters() -> None:
    with torch.device("meta"):  # shapes only: nothing allocated
        gray, rgb = resnet12(), resnet12(in_channels=3)
    assert _count(gray) == expected_parameters(1, WIDTHS)
    assert _count(rgb) == expected_parameters(3, WIDTHS)
    assert round(_count(rgb) / 1e6, 1) == 12.4 and round(_count(gray) / 1e6, 1) == 12.4
    assert WIDTHS == (64, 160, 320, 640)


@pytest.mark.parametrize("side", [16, 21, 33])
def test_features_are_the_last_width_at_any_size(side: int) -> None:
    net = resnet12(widths=NARROW)
    images = torch.randn(5, 1, side, side)
    assert net(images).shape == (5, NARROW[-1])
    rgb = resnet12(in_channels=3, widths=NARROW)
    assert rgb(torch.randn(2, 3, side, side)).shape == (2, NARROW[-1])


def test_task_shapes_and_metadata(root: Path) -> None:
    task = _task(root)
    setup = task.metadata["setup"]
    assert setup.feature_dim == NARROW[-1]
    assert task.metadata["backbone_parameters"] == expected_parameters(1, NARROW)
    assert task.metadata["widths"] == NARROW and task.metadata["hidden"] is None
    assert sum(v.numel() for v in task.x0.values()) == expected_parameters(1, NARROW)
    batch = next(iter(task.problem.task_data))
    assert batch.support_x.shape == (2, 2, 1, 16, 16)
    assert setup.support_features(task.x0, batch).shape == (2, 2, NARROW[-1])
    y0 = task.problem.init_lower(task.x0)
    assert y0["weight"].shape == (2, 2, NARROW[-1]) and y0["bias"].shape == (2, 2)
    maml = _task(root, form="maml")
    assert maml.x0["classifier.weight"].shape == (2, NARROW[-1])
    assert maml.problem.init_lower(maml.x0).keys() == maml.x0.keys()
    assert _task(root, widths=None, backbone="conv4").metadata["hidden"] == 32


def test_bad_backbone_options_raise(root: Path) -> None:
    with pytest.raises(ValueError, match="backbone must be one of conv4, resnet12"):
        _task(root, backbone="resnet18")
    with pytest.raises(ValueError, match="hidden sets conv-4's width"):
        _task(root, hidden=8)
    with pytest.raises(ValueError, match="widths sets ResNet-12's channels"):
        _task(root, backbone="conv4")
    with pytest.raises(ValueError, match="widths must be 4 positive integers"):
        _task(root, widths=(4, 4, 4))
    with pytest.raises(ValueError, match="widths must be 4 positive integers"):
        _task(root, widths=(4, 4, 0, 4))
    with pytest.raises(ValueError, match="image_size must be >= 16"):
        _task(root, image_size=15)


# MAML's lower loss does not see x (only its start, init_lower, does), so an implicit method's
# hypergradient there is zero whatever the backbone: cg runs in the feature form only
@pytest.mark.parametrize(
    ("form", "name"),
    [("feature", "esj"), ("feature", "itd"), ("feature", "cg"), ("maml", "esj"), ("maml", "itd")],
)
def test_one_outer_step_gives_a_finite_hypergradient(root: Path, form: str, name: str) -> None:
    task = _task(root, form=form)
    method = bl.method(name, **task.method_options(name))
    hg = bl.hypergrad(task.problem, task.x0, None, method)
    assert hg.keys() == task.x0.keys()
    for k, v in hg.items():
        assert v.shape == task.x0[k].shape and bool(torch.isfinite(v).all()), k
    assert float(tr.norm(hg)) > 0
    task = _task(root, form=form)
    result = bl.solve(task.problem, task.x0, None, method, steps=1, outer_lr=1e-3)
    assert float(tr.norm(tr.sub(result.x, task.x0))) > 0
    assert np.isfinite(result.history[-1]["upper_loss"])


def test_cg_hypergradient_equals_finite_differences(root: Path) -> None:
    """Feature form, float64: with the heads solved (gradient norm < 1e-10; 5e-12 measured),
    CG's implicit hypergradient is the derivative of x -> f(x, y*(x)), checked along random
    directions by central differences of the same inner loop (plain GD from zero heads);
    measured relative errors 1e-8 and 2e-9."""
    steps, lr = 1500, 0.1  # head_l2 = 5: L ≈ 17, μ ≈ 0.16 on these features
    task = _task(root, meta_batch=1, head_l2=5.0, dtype=torch.float64)
    setup = task.metadata["setup"]
    batch = next(iter(task.problem.task_data))  # the batch of the problem's first step

    def heads(x: dict) -> tuple[dict, dict]:
        support = setup.features(x, batch.support_x)

        def lower(h: dict) -> torch.Tensor:
            return setup.head_loss(support, batch.support_y, h)

        y = setup.zero_heads(x, 1)
        for _ in range(steps):
            y = tr.axpy(-lr, grad(lower)(y), y)
        return y, grad(lower)(y)

    def outer(x: dict) -> float:
        y, _ = heads(x)
        return float(setup.head_upper(setup.features(x, batch.query_x), y, batch))

    _, residual = heads(task.x0)
    assert float(tr.norm(residual)) < 1e-10  # the inner problem is solved
    method = bl.method("cg", inner_steps=steps, inner_lr=lr, solver_iters=50, solver_tol=1e-13)
    hg = bl.hypergrad(task.problem, task.x0, None, method)
    gen = torch.Generator().manual_seed(0)
    eps = 1e-6
    for _ in range(2):
        u = tr.randn_like(task.x0, generator=gen)
        fd = (outer(tr.axpy(eps, u, task.x0)) - outer(tr.axpy(-eps, u, task.x0))) / (2 * eps)
        assert abs(float(tr.dot(hg, u)) - fd) <= 1e-7 * abs(fd), (float(tr.dot(hg, u)), fd)


@pytest.mark.parametrize("image_size", [16, 32])
def test_default_inner_step_is_one_over_the_head_curvature(root: Path, image_size: int) -> None:
    """The 640 features make the head problem stiff (L in the hundreds, depending on the images):
    the task's ResNet-12 inner_lr is 1/L of its first support set at x0 (one significant digit),
    so inner_lr·L ≈ 1 where conv-4's constant 0.1 would be far above 2. L is measured here
    independently, by power iteration on the task's own lower loss (with its head_l2)."""
    task = _task(root, widths=None, meta_batch=1, image_size=image_size)
    setup = task.metadata["setup"]
    batch = next(iter(task.problem.task_data))
    support = setup.features(task.x0, batch.support_x)

    def lower_grad(h: dict) -> dict:
        return grad(lambda h_: setup.head_loss(support, batch.support_y, h_))(h)

    y = setup.zero_heads(task.x0, 1)
    v = tr.randn_like(y, generator=torch.Generator().manual_seed(1))
    for _ in range(50):  # power iteration on the lower Hessian at the zero heads
        hv = torch.func.jvp(lower_grad, (y,), (v,))[1]
        curvature, v = float(tr.norm(hv) / tr.norm(v)), tr.scale(hv, 1 / tr.norm(hv))
    lr = task.method_options("itd")["inner_lr"]
    assert 0.6 < lr * curvature < 1.6 and 0.1 * curvature > 2, (lr, curvature)
    assert lr == setup.inner_lr == _task(root, form="maml", widths=None, meta_batch=1,
                                         image_size=image_size).metadata["setup"].inner_lr
    assert task.metadata["head_curvature"] == pytest.approx(curvature, rel=1e-4)
    assert _task(root, backbone="conv4", widths=None).method_options("itd")["inner_lr"] == 0.1

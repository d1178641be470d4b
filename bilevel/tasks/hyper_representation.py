"""Hyper-representation: the outer variable is a feature map, the inner one a ridge head on it.

    lower(x, w) = ½·mean((φ_x(X_tr) w − t_tr)²) + ½·reg·‖w‖²      (train set)
    upper(x, w) = ½·mean((φ_x(X_val) w − t_val)²)                  (validation set)

``linear``: φ_H(X) = X H with H ∈ R^{p×d}. ``deep``: φ is a two-layer sigmoid network
(p → hidden → d, the paper's 256 → 512 → 256) whose parameters are x. Targets come from a
teacher of the same form: t = φ_true(X) w_true + noise·ε. Train, validation and test sets have
n samples each. The setting of Sow, Ji, Liang, "ES-Based Jacobian Enables Faster Bilevel
Optimization" (arXiv 2110.07004), experiments 1 and 2.

``scale="paper"`` is the authors' notebooks (sowmaster/esjacobians): N(0,1) data, teacher and
starting weights; deep form without biases and ridge reg = 0.001 (their ``b``), linear reg = 0.1.
With inner GD 1e-3 × 20 steps their inner loop covers most of the way to w*. ``scale=
"normalized"`` (the default) divides data and weights by √p, √d and uses PyTorch's default
initialisation with biases: a better-conditioned, different problem (about 4 % of the way to
w* in 20 steps). ``metadata["paper_outer_lr"]`` holds the notebooks' Adam learning rate per
method (they differ per method; benchmarks pass them as ``outer_lr``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from bilevel.modules import functional
from bilevel.problem import Problem
from bilevel.solve import StepContext
from bilevel.tasks.base import Task, register_task, solver_defaults
from bilevel.tree import Tree

_DEFAULTS = {
    "linear": {"p": 64, "d": 128, "n": 500, "hidden": 0},
    "deep": {"p": 256, "d": 256, "n": 5000, "hidden": 512},
}


def feature_network(
    p: int, hidden: int, d: int, gen: torch.Generator, dtype: torch.dtype, device,
    paper: bool = False,
) -> tuple[nn.Module, Tree]:
    """The deep feature map (Linear, Sigmoid, Linear, Sigmoid) and a parameter tree drawn from
    ``gen`` with PyTorch's default U(±1/√fan_in) scale, or (``paper``) without biases and with
    N(0,1) weights as in the authors' notebook (the module is never initialised with the global
    RNG)."""
    net = nn.Sequential(
        nn.utils.skip_init(nn.Linear, p, hidden, bias=not paper, dtype=dtype, device=device),
        nn.Sigmoid(),
        nn.utils.skip_init(nn.Linear, hidden, d, bias=not paper, dtype=dtype, device=device),
        nn.Sigmoid(),
    )
    tree = {}
    for name, param in net.named_parameters():
        fan_in = net[int(name.split(".")[0])].in_features
        bound = 1.0 / math.sqrt(fan_in)
        if paper:
            draw = torch.randn(param.shape, generator=gen, dtype=dtype)
        else:
            draw = (2 * torch.rand(param.shape, generator=gen, dtype=dtype) - 1) * bound
        tree[name] = draw.to(device)
    with torch.no_grad():
        for name, param in net.named_parameters():
            param.copy_(tree[name])
    return net, {k: v.clone() for k, v in tree.items()}


SCALES = ("normalized", "paper")


def _paper_outer_lr(kind: str, p: int) -> dict[str, float]:
    """Adam learning rates of the authors' notebooks per method (linear p = 64 unless noted;
    CG at p = 128 diverges at 0.05 and runs at 0.01, per the issue's measurements)."""
    if kind == "deep":
        return {"esj": 0.01, "esj_s": 0.01, "direct": 0.01, "fixed_point": 0.01, "cg": 0.01,
                "itd": 0.01, "hozog": 0.2}  # fmt: skip
    return {"esj": 0.05, "esj_s": 0.05, "direct": 0.05, "fixed_point": 0.05,
            "cg": 0.05 if p <= 64 else 0.01, "itd": 0.05, "hozog": 0.1}  # fmt: skip


@register_task("hyper_representation")
def hyper_representation(
    kind: str = "linear",
    p: int | None = None,
    d: int | None = None,
    n: int | None = None,
    hidden: int | None = None,
    reg: float | None = None,
    noise: float = 0.1,
    scale: str = "normalized",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
) -> Task:
    """Linear (p = 64, d = 128, n = 500) or deep (256 → 512 → 256, n = 5000) hyper-representation;
    ``None`` sizes take the kind's paper values.

    x is ``{"H": p×d}`` (linear) or the feature network's parameter tree (deep; the module is
    ``task.metadata["model"]``); y is ``{"w": d}``, started at a fixed seeded point. Callbacks
    log ``val_loss`` and ``test_loss`` (same form as the upper loss) at the inner iterate.
    ``metadata`` also holds ``features(x, inputs)`` and the ``splits`` (inputs, targets) by name
    ("train", "val", "test"), for closed-form checks (the inner problem is ridge regression).
    ``scale``: "normalized" or "paper" (see the module docstring); ``reg`` ``None`` is 0.1, or
    0.001 for the deep form at the paper's scale.
    """
    if kind not in _DEFAULTS:
        raise ValueError(f"kind must be one of {sorted(_DEFAULTS)}, got {kind!r}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    paper = scale == "paper"
    if reg is None:
        reg = 0.001 if paper and kind == "deep" else 0.1
    sizes = _DEFAULTS[kind]
    p = sizes["p"] if p is None else p
    d = sizes["d"] if d is None else d
    n = sizes["n"] if n is None else n
    hidden = sizes["hidden"] if hidden is None else hidden
    for name, value in (("p", p), ("d", d), ("n", n)) + (
        (("hidden", hidden),) if kind == "deep" else ()
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype).to(device)

    root_p, root_d = (1.0, 1.0) if paper else (math.sqrt(p), math.sqrt(d))
    if kind == "linear":
        model = None
        true_x = {"H": randn(p, d) / root_p}
        x0 = {"H": randn(p, d) / root_p}

        def features(x: Tree, inputs: Tensor) -> Tensor:
            return inputs @ x["H"]

    else:
        _, true_x = feature_network(p, hidden, d, gen, dtype, device, paper)
        model, x0 = feature_network(p, hidden, d, gen, dtype, device, paper)
        apply = functional(model)

        def features(x: Tree, inputs: Tensor) -> Tensor:
            return apply(x, inputs)

    w_true = randn(d) / root_d
    splits = {}
    for split in ("train", "val", "test"):
        inputs = randn(n, p)
        with torch.no_grad():
            targets = features(true_x, inputs) @ w_true + noise * randn(n)
        splits[split] = (inputs, targets)

    def head_mse(z: Tensor, y: Tree, split: str) -> Tensor:
        return 0.5 * torch.mean((z @ y["w"] - splits[split][1]) ** 2)

    def mse(x: Tree, y: Tree, split: str) -> Tensor:
        return head_mse(features(x, splits[split][0]), y, split)

    # the losses see x only through the features of each split: declared as representations,
    # they are computed once per outer step instead of once per inner gradient
    problem = Problem(
        upper=lambda z, y, batch: head_mse(z, y, "val"),
        lower=lambda z, y, batch: head_mse(z, y, "train") + 0.5 * reg * torch.sum(y["w"] ** 2),
        upper_representation=lambda x, batch: features(x, splits["val"][0]),
        lower_representation=lambda x, batch: features(x, splits["train"][0]),
    )

    def metrics(ctx: StepContext) -> dict[str, float]:
        return {
            "val_loss": float(mse(ctx.x, ctx.state.y, "val")),
            "test_loss": float(mse(ctx.x, ctx.state.y, "test")),
        }

    inner_steps = 20 if kind == "linear" else 10
    return Task(
        name="hyper_representation",
        problem=problem,
        x0=x0,
        y0={"w": randn(d) / root_d},
        callbacks=[metrics],
        metadata={
            "kind": kind,
            "p": p,
            "d": d,
            "n": n,
            "hidden": hidden if kind == "deep" else None,
            "reg": reg,
            "noise": noise,
            "scale": scale,
            "paper_outer_lr": _paper_outer_lr(kind, p),
            "seed": seed,
            "model": model,
            "features": features,
            "splits": splits,
        },
        # the paper: GD 1e-3 with a fixed start, N = 20 (linear) / 10 (deep); ES μ 0.01 / 0.1
        method_defaults={
            "inner_steps": inner_steps,
            "inner_lr": 1e-3,
            "inner_optimizer": "gd",
            "warm_start": False,
            **solver_defaults(solver_lr=1e-3),
            "lancbio": {"fallback_lr": 1e-3},
            **{
                name: {"directions": 1, "radius": 0.01 if kind == "linear" else 0.1}
                for name in ("esj", "esj_s", "hozog")
            },
        },
        solve_defaults={
            "steps": 100,
            "outer_optimizer": "adam",
            "outer_lr": 0.05 if kind == "linear" else 0.01,
        },
    )

"""Per-feature L2 regularisation of logistic regression, tuned on a validation set.

    lower(x, y) = CE(train; W, b) + ½ Σⱼ λⱼ ‖Wⱼ‖²,   λⱼ = min(exp(xⱼ), max_l2)   (b unpenalised)
    upper(x, y) = CE(validation; W, b)

Binary datasets use the logistic loss with W ∈ R^d, multi-class ones the multinomial loss with
W ∈ R^{d×C}; Wⱼ are feature j's weights. The lower level is strongly convex for every x, so
y*(x) is unique. The cap ``max_l2`` bounds the lower level's smoothness for every x, so one
fixed inner step size stays stable however far the outer optimizer pushes x (an uncapped
useless feature's weight grows without bound under Adam). The classic
hyperparameter-optimisation benchmark of Pedregosa, "Hyperparameter optimization with
approximate gradient", ICML 2016, on a scikit-learn bundled dataset (no download).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bilevel.data.tabular import load_sklearn, standardize
from bilevel.problem import Problem
from bilevel.solve import StepContext
from bilevel.tasks.base import Task, register_task, solver_defaults
from bilevel.tree import Tree

SPLITS = ("train", "val", "test")


def _split(n: int, fractions: tuple[float, float], gen: torch.Generator) -> list[np.ndarray]:
    perm = torch.randperm(n, generator=gen).numpy()
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    return [perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]]


@register_task("l2_regularization")
def l2_regularization(
    dataset: str = "breast_cancer",
    train_fraction: float = 0.5,
    val_fraction: float = 0.25,
    log_l2_init: float = 0.0,
    max_l2: float = 10.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
) -> Task:
    """Logistic regression on a scikit-learn dataset (``breast_cancer``: binary, 569 × 30;
    ``digits``: 10 classes, 1797 × 64; also ``iris``, ``wine``) with one L2 weight exp(xⱼ) per
    feature (capped at ``max_l2``).

    A seeded permutation splits the samples train/validation/test (default 50/25/25); features
    are standardised with the training statistics. x = ``{"log_l2": d}`` starts at
    ``log_l2_init``; y = ``{"W", "b"}`` starts at 0. Callbacks log ``val_accuracy``,
    ``test_loss`` and ``test_accuracy`` at the inner iterate.
    """
    if not (train_fraction > 0 and val_fraction > 0 and train_fraction + val_fraction < 1):
        raise ValueError(
            "train_fraction and val_fraction must be positive with a sum below 1, got "
            f"{train_fraction}, {val_fraction}"
        )
    if not max_l2 > 0:
        raise ValueError(f"max_l2 must be positive, got {max_l2}")
    features, labels = load_sklearn(dataset)
    gen = torch.Generator().manual_seed(seed)
    parts = _split(len(labels), (train_fraction, val_fraction), gen)
    scaled = standardize(*(features[idx] for idx in parts))
    data = {
        split: (
            torch.as_tensor(X, dtype=dtype, device=device),
            torch.as_tensor(labels[idx], device=device),
        )
        for split, X, idx in zip(SPLITS, scaled, parts, strict=True)
    }
    classes = int(labels.max()) + 1
    binary = classes == 2
    d = features.shape[1]

    def logits(y: Tree, split: str) -> Tensor:
        return data[split][0] @ y["W"] + y["b"]

    def cross_entropy(y: Tree, split: str) -> Tensor:
        target = data[split][1]
        if binary:
            return F.binary_cross_entropy_with_logits(logits(y, split), target.to(dtype))
        return F.cross_entropy(logits(y, split), target)

    def accuracy(y: Tree, split: str) -> float:
        out = logits(y, split)
        predicted = (out > 0).long() if binary else out.argmax(dim=1)
        return float((predicted == data[split][1]).to(dtype).mean())

    def penalty(x: Tree, y: Tree) -> Tensor:
        squares = y["W"] ** 2 if binary else torch.sum(y["W"] ** 2, dim=1)
        strength = torch.exp(torch.clamp(x["log_l2"], max=math.log(max_l2)))
        return 0.5 * torch.sum(strength * squares)

    problem = Problem(
        upper=lambda x, y, batch: cross_entropy(y, "val"),
        lower=lambda x, y, batch: cross_entropy(y, "train") + penalty(x, y),
    )

    def metrics(ctx: StepContext) -> dict[str, float]:
        y = ctx.state.y
        return {
            "val_accuracy": accuracy(y, "val"),
            "test_loss": float(cross_entropy(y, "test")),
            "test_accuracy": accuracy(y, "test"),
        }

    # smoothness of the training loss: λ_max(XᵀX/n) (with the bias column) times ¼ (logistic)
    # or ½ (softmax), plus the largest L2 weight
    X_train = data["train"][0]
    design = torch.cat([X_train, torch.ones_like(X_train[:, :1])], dim=1)
    gram_top = float(torch.linalg.eigvalsh(design.T @ design / len(design))[-1])
    lipschitz = (0.25 if binary else 0.5) * gram_top + max_l2
    shape = (d,) if binary else (d, classes)
    zeros = torch.zeros(shape, dtype=dtype, device=device)
    return Task(
        name="l2_regularization",
        problem=problem,
        x0={"log_l2": torch.full((d,), float(log_l2_init), dtype=dtype, device=device)},
        y0={"W": zeros, "b": torch.zeros(() if binary else (classes,), dtype=dtype, device=device)},
        callbacks=[metrics],
        metadata={
            "dataset": dataset,
            "classes": classes,
            "features": d,
            "sizes": {split: len(idx) for split, idx in zip(SPLITS, parts, strict=True)},
            "seed": seed,
            "max_l2": max_l2,
            "lipschitz_estimate": lipschitz,
        },
        method_defaults={
            "inner_steps": 50,
            "inner_lr": 1.0 / lipschitz,
            **solver_defaults(solver_iters=20, solver_lr=1.0 / lipschitz),
            "lancbio": {"fallback_lr": 1.0 / lipschitz},
        },
        solve_defaults={"steps": 100, "outer_optimizer": "adam", "outer_lr": 0.1},
    )

"""The peer benchmark's protocol: data, losses and settings shared by every implementation.

FashionMNIST hyper-cleaning from ``bilevel.tasks.hyper_cleaning`` (5k training samples with 50 %
corrupted labels, 5k validation, 10k test), a linear model logits = a @ Wᵀ + b (W 10×784, b 10),
one logit x_i per training sample (weight sigmoid(x_i)):

    g(x, y) = mean_i sigmoid(x_i)·CE_i(y) + weight_decay·(‖W‖² + ‖b‖²)     (lower)
    f(y)    = mean CE on the validation set                                 (upper)

Every implementation runs one outer step as: 10 warm-started GD inner steps at lr 0.5, a
hypergradient (AID-CG with exactly 10 iterations from v₀ = 0; Neumann α = 0.05 with 10 HVPs;
ITD through the 10 inner steps), then one Adam step (lr 0.03) on x. Float32, one thread.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from bilevel.tasks.hyper_cleaning import make_split

INNER_STEPS = 10
INNER_LR = 0.5
SOLVER_ITERS = 10  # CG iterations; also the number of HVPs of the Neumann series
NEUMANN_ALPHA = 0.05
OUTER_LR = 0.03
WEIGHT_DECAY = 0.01  # the task's default
N_TRAIN = N_VAL = 5000
METHODS = ("cg", "neumann", "itd")


@dataclass
class Data:
    """The split's tensors (rows are samples) in one dtype."""

    train: Tensor
    train_labels: Tensor
    val: Tensor
    val_labels: Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.train.dtype


def load_data(dtype: torch.dtype = torch.float32) -> Data:
    """The task's seeded split (seed 0), from the IDX files of Debian's dataset-fashion-mnist."""
    split = make_split(
        dataset="fashion_mnist", corruption=0.5, n_train=N_TRAIN, n_val=N_VAL, seed=0, dtype=dtype
    )
    return Data(split.train, split.train_labels, split.val, split.val_labels)


def lower_from_logits(x: Tensor, logits: Tensor, params: Iterable[Tensor], data: Data) -> Tensor:
    """g from the training logits and the model's parameters (for module-based peers)."""
    ce = F.cross_entropy(logits, data.train_labels, reduction="none")
    decay = sum(torch.sum(p * p) for p in params)
    return torch.mean(torch.sigmoid(x) * ce) + WEIGHT_DECAY * decay


def upper_from_logits(logits: Tensor, data: Data) -> Tensor:
    """f from the validation logits (f does not depend on x directly)."""
    return F.cross_entropy(logits, data.val_labels)


def lower_loss(x: Tensor, weight: Tensor, bias: Tensor, data: Data) -> Tensor:
    """g: weighted training cross-entropy plus weight decay on W and b."""
    return lower_from_logits(x, F.linear(data.train, weight, bias), (weight, bias), data)


def upper_loss(weight: Tensor, bias: Tensor, data: Data) -> Tensor:
    """f: validation cross-entropy."""
    return upper_from_logits(F.linear(data.val, weight, bias), data)


def initial_point(data: Data) -> tuple[Tensor, Tensor, Tensor]:
    """(x₀, W₀, b₀) = zeros: every sample weighted sigmoid(0) = 1/2, the model at zero."""
    zeros = {"dtype": data.dtype}
    return (
        torch.zeros(N_TRAIN, **zeros),
        torch.zeros(10, data.train.shape[1], **zeros),
        torch.zeros(10, **zeros),
    )


class Implementation:
    """One library's outer step on this protocol.

    Subclasses build their objects in ``__init__`` (untimed) and implement :meth:`step`: the
    inner loop, the hypergradient, and the Adam step on x. ``hypergradient`` holds the last
    hypergradient handed to Adam (a tensor like x) for the correctness check; ``x`` the current
    outer variable.
    """

    library: str = ""
    methods: tuple[str, ...] = METHODS

    def __init__(self, method: str, data: Data) -> None:
        if method not in self.methods:
            raise ValueError(f"{self.library} has no {method!r}; it has {', '.join(self.methods)}")
        self.method, self.data = method, data
        self.hypergradient: Tensor | None = None

    @property
    def x(self) -> Tensor:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError


def difference_to_task(data: Data) -> float:
    """Largest relative difference between this protocol's losses on ``data`` and the
    hyper_cleaning task's at a random point (the split and the losses must be the task's)."""
    from bilevel.tasks.hyper_cleaning import hyper_cleaning

    task = hyper_cleaning(
        dataset="fashion_mnist", weight_decay=WEIGHT_DECAY, seed=0, dtype=data.dtype
    )
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN, generator=gen, dtype=data.dtype)
    weight = 0.01 * torch.randn(10, data.train.shape[1], generator=gen, dtype=data.dtype)
    bias = 0.01 * torch.randn(10, generator=gen, dtype=data.dtype)
    xs, ys = {"x": x}, {"W": weight, "b": bias}
    pairs = (
        (lower_loss(x, weight, bias, data), task.problem.lower(xs, ys, None)),
        (upper_loss(weight, bias, data), task.problem.upper(xs, ys, None)),
    )
    return max(float(abs(ours - theirs) / abs(theirs)) for ours, theirs in pairs)

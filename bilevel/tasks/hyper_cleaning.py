"""Data hyper-cleaning: learn one weight per training sample so that a classifier trained on the
weighted, label-corrupted training set does well on a clean validation set.

Franceschi, Donini, Frasconi, Pontil, "Forward and Reverse Gradient-Based Hyperparameter
Optimization", ICML 2017 (the task); the pinned protocol is LancBiO's (Yang, Gao, Yuan, ICLR 2025),
see ``docs/tasks/hyper_cleaning.md``:

    x ∈ R^n_train (one logit per training sample, weight sigmoid(x_i)), x₀ = 0
    g(x, y) = mean_i sigmoid(x_i)·CE(model_y(a_i), ỹ_i) + weight_decay·‖y‖²
    f(x, y) = mean over validation of CE(model_y(a_j), y_j)

The split is a seeded permutation of the training images into disjoint train / validation parts
(the official test set is the test set); exactly ⌊p·n_train⌋ seeded training labels are replaced
by (label + U{1..9}) mod 10, always a wrong class.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bilevel.data.errors import DataNotFoundError
from bilevel.data.idx import load_fashion_mnist
from bilevel.data.tabular import load_sklearn
from bilevel.diagnostics import diagnostic_callbacks
from bilevel.modules import functional, params
from bilevel.problem import Problem
from bilevel.solve import StepContext
from bilevel.tasks.base import Task, register_task, solver_defaults
from bilevel.tree import Tree

NUM_CLASSES = 10
REFIT_STEPS = 100  # L-BFGS iterations of the reference fits and of refit_test_accuracy
# default (train, validation) sizes; digits keeps its remaining 597 images as the test set
DEFAULT_SPLIT = {"fashion_mnist": (5000, 5000), "digits": (600, 600)}
# Inner GD step below 2/L: the lower loss's largest Hessian eigenvalue L (power iteration on HVPs,
# linear model, all weights 1, y trained) is about 13.6 on FashionMNIST and 1.2 on digits.
INNER_LR = {"fashion_mnist": 0.1, "digits": 1.0}
# The MLP's lower Hessian is indefinite at the warm-started inner iterates: the damping the
# methods default to on model="mlp", LancBiO's larger (its one-vector cycles meet near-zero
# curvature; 0.03 over 0.1: FashionMNIST above the naive reference on 3/3 seeds, not 2/3;
# benchmarks/implicit_networks/README.md)
RIDGE_MLP = 0.01
RIDGE_MLP_LANCBIO = 0.03


@dataclass
class CleaningSplit:
    """One seeded split: features in [0, 1] (rows are samples), labels as int64 tensors.

    ``train_labels`` are the corrupted labels the lower loss sees, ``train_true`` the originals;
    ``clean`` is the boolean mask of uncorrupted training samples; ``train_index`` and
    ``val_index`` are the rows of the training pool (FashionMNIST's 60k, or all of digits) that
    were drawn. ``model`` is the inner model
    ("linear" or "mlp" with ``hidden`` units) and ``weight_decay`` the lower loss's coefficient,
    so :func:`reference_points` trains exactly the task's inner problem.
    """

    train: Tensor
    train_labels: Tensor
    train_true: Tensor
    val: Tensor
    val_labels: Tensor
    test: Tensor
    test_labels: Tensor
    clean: Tensor
    train_index: Tensor
    val_index: Tensor
    model: str
    hidden: int
    weight_decay: float
    seed: int


class IndexBatches:
    """Seeded, reshuffling, endless stream of index batches over ``range(n)``.

    Each epoch is a fresh permutation from the stream's own generator; the last incomplete batch
    of an epoch is dropped so every batch has ``min(batch_size, n)`` indices. ``iter()`` restarts
    from the seed, so a resumed run replays the same batches (see ``Problem.skip_batches``).
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, device: str | torch.device = "cpu"
    ) -> None:
        if n < 1 or batch_size < 1:
            raise ValueError(f"n and batch_size must be >= 1, got {n}, {batch_size}")
        self.n, self.batch_size, self.seed, self.device = n, min(batch_size, n), seed, device

    def __iter__(self) -> Iterator[Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        per_epoch = self.n // self.batch_size
        while True:
            order = torch.randperm(self.n, generator=gen).to(self.device)
            yield from order[: per_epoch * self.batch_size].split(self.batch_size)


def _load_arrays(
    dataset: str, data_root: str | os.PathLike | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(pool features in [0, 1], pool labels, test features, test labels); test is None for
    datasets without an official test split (digits)."""
    if dataset == "fashion_mnist":
        try:
            data = load_fashion_mnist(data_root)
        except DataNotFoundError as err:
            raise DataNotFoundError(
                f"{err}\nhyper_cleaning needs FashionMNIST: install the Debian package "
                "`dataset-fashion-mnist`, or use dataset='digits' (bundled with scikit-learn)."
            ) from err
        train, test = (data[f"{s}_images"].reshape(-1, 784) for s in ("train", "test"))
        return (
            train.astype(np.float32) / 255.0,
            data["train_labels"].astype(np.int64),
            test.astype(np.float32) / 255.0,
            data["test_labels"].astype(np.int64),
        )
    if dataset == "digits":
        features, labels = load_sklearn("digits")
        return features / 16.0, labels, None, None
    raise ValueError(f"unknown dataset {dataset!r}; choose 'fashion_mnist' or 'digits'")


def make_split(
    dataset: str = "fashion_mnist",
    corruption: float = 0.5,
    n_train: int | None = None,
    n_val: int | None = None,
    seed: int = 0,
    data_root: str | os.PathLike | None = None,
    model: str = "linear",
    hidden: int = 300,
    weight_decay: float = 0.01,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> CleaningSplit:
    """The pinned split and corruption, deterministic given ``seed``.

    ``n_train`` / ``n_val`` left ``None`` take the dataset's default (:data:`DEFAULT_SPLIT`:
    5000 / 5000 on FashionMNIST, 600 / 600 on digits). digits has no test split: train and
    validation come from one seeded permutation and the rest is the test set, so sizes that
    leave no test image are refused (never silently replaced).
    """
    if not 0 <= corruption <= 1:
        raise ValueError(f"corruption must be in [0, 1], got {corruption}")
    pool, pool_labels, test, test_labels = _load_arrays(dataset, data_root)
    default_train, default_val = DEFAULT_SPLIT[dataset]
    n_train = default_train if n_train is None else n_train
    n_val = default_val if n_val is None else n_val
    if n_train < 1 or n_val < 1:
        raise ValueError(f"n_train and n_val must be >= 1, got {n_train}, {n_val}")
    limit = len(pool) - (1 if test is None else 0)  # digits needs an image left for its test set
    if n_train + n_val > limit:
        raise ValueError(
            f"{dataset}: n_train + n_val = {n_train + n_val} exceeds the {limit} images available"
            + (" (the rest of the pool is the test set)" if test is None else "")
        )
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(pool), generator=gen).numpy()
    train_idx, val_idx = order[:n_train], order[n_train : n_train + n_val]
    if test is None:
        test_idx = order[n_train + n_val :]
        test, test_labels = pool[test_idx], pool_labels[test_idx]
    true = torch.from_numpy(pool_labels[train_idx])
    corrupted = torch.randperm(n_train, generator=gen)[: math.floor(corruption * n_train)]
    shift = torch.randint(1, NUM_CLASSES, (len(corrupted),), generator=gen)
    noisy = true.clone()
    noisy[corrupted] = (true[corrupted] + shift) % NUM_CLASSES
    clean = torch.ones(n_train, dtype=torch.bool)
    clean[corrupted] = False

    def floats(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)

    def ints(a: np.ndarray | Tensor) -> Tensor:
        return torch.as_tensor(a, dtype=torch.int64).to(device)

    return CleaningSplit(
        train=floats(pool[train_idx]),
        train_labels=ints(noisy),
        train_true=ints(true),
        val=floats(pool[val_idx]),
        val_labels=ints(pool_labels[val_idx]),
        test=floats(test),
        test_labels=ints(test_labels),
        clean=clean.to(device),
        train_index=torch.from_numpy(train_idx),
        val_index=torch.from_numpy(val_idx),
        model=model,
        hidden=hidden,
        weight_decay=weight_decay,
        seed=seed,
    )


def inner_model(split: CleaningSplit) -> tuple[Callable[[Tree, Tensor], Tensor], Tree]:
    """``(apply(y, features) -> logits, y0)`` for the split's model.

    linear: y = {"W": 10×d, "b": 10} at zero, logits = ``F.linear(features, W, b)`` (the fastest
    layout on the 2-core machines). mlp: d→hidden→10 ReLU network, PyTorch's default uniform
    init drawn from a generator seeded with ``split.seed``.
    """
    d, dtype, device = split.train.shape[1], split.train.dtype, split.train.device
    if split.model == "linear":
        y0 = {
            "W": torch.zeros(NUM_CLASSES, d, dtype=dtype, device=device),
            "b": torch.zeros(NUM_CLASSES, dtype=dtype, device=device),
        }
        return (lambda y, a: F.linear(a, y["W"], y["b"])), y0
    if split.model == "mlp":
        net = nn.Sequential(nn.Linear(d, split.hidden), nn.ReLU(), nn.Linear(split.hidden, 10))
        gen = torch.Generator().manual_seed(split.seed)
        with torch.no_grad():
            for layer in (net[0], net[2]):
                bound = 1.0 / math.sqrt(layer.in_features)
                for p in (layer.weight, layer.bias):
                    p.uniform_(-bound, bound, generator=gen)
        net = net.to(device=device, dtype=dtype)
        return functional(net), params(net)
    raise ValueError(f"unknown model {split.model!r}; choose 'linear' or 'mlp'")


def _sum_squares(y: Tree) -> Tensor:
    return sum(torch.sum(v * v) for v in y.values())


def _accuracy(apply: Callable[[Tree, Tensor], Tensor], y: Tree, a: Tensor, labels: Tensor) -> float:
    return 100.0 * float((apply(y, a).argmax(dim=1) == labels).float().mean())


def detection_scores(x: Tensor, clean: Tensor) -> dict[str, float]:
    """Precision, recall and F1 of "clean" predicted as sigmoid(x_i) > 0.5, against ``clean``."""
    predicted = x > 0
    hits = float((predicted & clean).sum())
    precision = hits / max(float(predicted.sum()), 1.0)
    recall = hits / max(float(clean.sum()), 1.0)
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return {"f1": f1, "precision": precision, "recall": recall}


def reference_points(
    task_or_split: Task | CleaningSplit, steps: int = REFIT_STEPS, seed: int = 0
) -> dict[str, float]:
    """Test accuracy (percent) of the inner model trained alone on the lower loss with all
    weights 1: on the truly clean training samples only ("oracle") and on every corrupted
    sample ("naive"). Full-batch L-BFGS (strong Wolfe) for ``steps`` iterations; the MLP's
    start is drawn with ``seed``. Nothing is cached.
    """
    split = task_or_split.metadata["data"] if isinstance(task_or_split, Task) else task_or_split
    apply, y0 = inner_model(CleaningSplit(**{**vars(split), "seed": seed}))
    out = {}
    for name, rows in (("oracle", split.clean), ("naive", slice(None))):
        y = _fit(apply, y0, split.train[rows], split.train_labels[rows], split.weight_decay, steps)
        with torch.no_grad():
            out[name] = _accuracy(apply, y, split.test, split.test_labels)
    return out


def _fit(
    apply: Callable[[Tree, Tensor], Tensor],
    y0: Tree,
    a: Tensor,
    labels: Tensor,
    weight_decay: float,
    steps: int,
    weights: Tensor | None = None,
) -> Tree:
    """Minimise mean (weighted) CE + weight_decay·‖y‖² over y from y0 by full-batch L-BFGS."""
    y = {k: v.detach().clone().requires_grad_(True) for k, v in y0.items()}
    opt = torch.optim.LBFGS(list(y.values()), max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        ce = F.cross_entropy(apply(y, a), labels, reduction="none")
        ce = ce if weights is None else weights * ce
        loss = torch.mean(ce) + weight_decay * _sum_squares(y)
        loss.backward()
        return loss

    opt.step(closure)
    return y


def solver_blocks(dataset: str, model: str) -> dict[str, dict[str, object]]:
    """The per-method linear-solve defaults: J = 5 HVPs, the solve's step = the inner step,
    on the MLP ``ridge`` = RIDGE_MLP (LancBiO: RIDGE_MLP_LANCBIO) and a warm-started neumann;
    LancBiO's hyper-cleaning schedule (m from 1, ×1.3 every 50 steps, at most 10)."""
    mlp = model == "mlp"
    blocks = solver_defaults(
        solver_iters=5, solver_lr=INNER_LR[dataset], ridge=RIDGE_MLP if mlp else None
    )
    blocks.setdefault("lancbio", {}).update(
        fallback_lr=INNER_LR[dataset], m=1, m_growth=1.3, m_period=50, m_max=10
    )
    if mlp:
        blocks["lancbio"]["ridge"] = RIDGE_MLP_LANCBIO
        # from scratch neumann's J = 5 terms leave the flat directions short: below the naive
        # reference on 2 of 3 FashionMNIST seeds; warm-started, above it on all 3 at the same
        # cost (benchmarks/implicit_networks/README.md)
        blocks["neumann"]["solver_warm_start"] = True
    return blocks


@register_task("hyper_cleaning")
def hyper_cleaning(
    dataset: str = "fashion_mnist",
    corruption: float = 0.5,
    model: str = "linear",
    hidden: int = 300,
    n_train: int | None = None,
    n_val: int | None = None,
    batch_size: int | None = None,
    weight_decay: float = 0.01,
    seed: int = 0,
    data_root: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    diagnostics: bool = False,
    refit_accuracy: bool = False,
) -> Task:
    """Data hyper-cleaning on FashionMNIST (or sklearn digits, needing no system package).

    ``batch_size=None`` is the full-batch task (batches are ``None``); an integer gives seeded,
    reshuffling, restartable streams of index batches for both levels (the spec's mini-batch
    setting: ``n_train=20000, n_val=5000, batch_size=256``). Callbacks log ``test_accuracy``
    (percent), ``val_loss`` and the clean-sample detection ``f1`` / ``precision`` / ``recall``.
    ``diagnostics=True`` adds the residual ‖A v − b‖ and the method's step info
    (:func:`bilevel.diagnostics.diagnostic_callbacks`). ``metadata["data"]`` is the
    :class:`CleaningSplit`. ``refit_accuracy=True`` also logs ``refit_test_accuracy``: the
    test accuracy of the inner model fitted from y₀ to the lower loss weighted by sigmoid(x)
    alone (L-BFGS, as :func:`reference_points`) — an accuracy of x only, comparable across
    methods whose y_K differ in training (BDA's inner steps also descend the upper loss on the
    validation labels; a few inner steps leave y_K under-trained). ``metadata["clean_indices"]``
    are the truly clean training samples; :func:`reference_points` gives the oracle / naive
    accuracies.

    Defaults (measured on FashionMNIST, linear, p = 0.5, 5k/5k; docs/tasks/hyper_cleaning.md):
    LancBiO's T = 5 warm-started inner steps, but heavy-ball momentum instead of GD (about one
    more point of test accuracy at equal time: y is under-trained otherwise) with ``inner_lr``
    0.1 (the lower loss's L reaches 13.6; heavy ball needs lr·L < 3.8; digits: L 1.2, lr 1.0);
    warm-started CG with ``solver_iters=5`` (10 doubles the step cost for no gain in budget).
    Outer Adam with lr 0.3: with mean-CE losses the hypergradient entries are ~1e-4 and scale
    with 1/n_train, so SGD would need a step of order 10³–10⁴ (LancBiO's λ = 500 is for their
    scaling); Adam moves each logit by about lr per step whatever n_train. With one thread, after
    120 s: cg 79.4% test accuracy / F1 0.926, itd 79.0% / 0.928; oracle 80.3%, naive 78.3%.
    """
    split = make_split(
        dataset=dataset,
        corruption=corruption,
        n_train=n_train,
        n_val=n_val,
        seed=seed,
        data_root=data_root,
        model=model,
        hidden=hidden,
        weight_decay=weight_decay,
        dtype=dtype,
        device=device,
    )
    apply, y0 = inner_model(split)
    n_train, n_val = len(split.train), len(split.val)
    a_train, l_train, a_val, l_val = split.train, split.train_labels, split.val, split.val_labels

    def lower(x: Tree, y: Tree, idx: Tensor | None) -> Tensor:
        a, labels, logit = a_train, l_train, x["x"]
        if idx is not None:
            a, labels, logit = a[idx], labels[idx], logit[idx]
        ce = F.cross_entropy(apply(y, a), labels, reduction="none")
        return torch.mean(torch.sigmoid(logit) * ce) + weight_decay * _sum_squares(y)

    def upper(x: Tree, y: Tree, idx: Tensor | None) -> Tensor:
        a, labels = (a_val, l_val) if idx is None else (a_val[idx], l_val[idx])
        return F.cross_entropy(apply(y, a), labels)

    streams = (None, None)
    if batch_size is not None:
        streams = (
            IndexBatches(n_train, batch_size, seed + 1, device),
            IndexBatches(n_val, batch_size, seed + 2, device),
        )
    problem = Problem(upper=upper, lower=lower, lower_data=streams[0], upper_data=streams[1])

    def metrics(ctx: StepContext) -> dict[str, float]:
        with torch.no_grad():
            y = ctx.state.y
            out = {
                "test_accuracy": _accuracy(apply, y, split.test, split.test_labels),
                "val_loss": float(F.cross_entropy(apply(y, a_val), l_val)),
                **detection_scores(ctx.x["x"], split.clean),
            }
        if refit_accuracy:
            out["refit_test_accuracy"] = refit_test_accuracy(ctx.x["x"])
        return out

    def refit_test_accuracy(logits: Tensor) -> float:
        weights = torch.sigmoid(logits.detach())
        y = _fit(apply, y0, a_train, l_train, weight_decay, REFIT_STEPS, weights)
        with torch.no_grad():
            return _accuracy(apply, y, split.test, split.test_labels)

    def references() -> dict[str, dict[str, float]]:
        return {name: {"test_accuracy": acc} for name, acc in reference_points(split).items()}

    return Task(
        name="hyper_cleaning",
        references=references,
        problem=problem,
        x0={"x": torch.zeros(n_train, dtype=dtype, device=device)},
        y0=y0,
        callbacks=[metrics, *(diagnostic_callbacks(problem) if diagnostics else [])],
        metadata={
            "dataset": dataset,
            "corruption": corruption,
            "model": model,
            "n_train": n_train,
            "n_val": n_val,
            "n_test": len(split.test),
            "n_corrupted": int((~split.clean).sum()),
            "batch_size": batch_size,
            "weight_decay": weight_decay,
            "seed": seed,
            "clean_indices": torch.nonzero(split.clean).flatten().cpu(),
            "data": split,
        },
        method_defaults={
            "inner_steps": 5,
            "inner_lr": INNER_LR[dataset],
            "inner_optimizer": "momentum",
            "warm_start": True,
            **solver_blocks(dataset, model),
        },
        solve_defaults={"steps": 3000, "outer_optimizer": "adam", "outer_lr": 0.3},
    )

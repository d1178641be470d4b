"""Few-shot classification on an Omniglot-layout image folder, in two bilevel forms.

``form="feature"`` — meta-feature learning (Franceschi, Frasconi, Salzo, Grazzi, Pontil,
"Bilevel Programming for Hyperparameter Optimization and Meta-Learning", ICML 2018): x is a
feature extractor shared by all tasks (``backbone``: conv-4, or the ResNet-12 of
:mod:`bilevel.tasks.resnet12`), y the per-task linear heads, re-initialised at zero every outer
step; the inner problem is L2-regularised support cross-entropy, the outer one query
cross-entropy. This is the setting of ESJ (Sow, Ji, Liang, arXiv 2110.07004) and BDA (Liu et al.,
ICML 2020).

``form="maml"`` — MAML (Finn, Abbeel, Levine, "Model-Agnostic Meta-Learning for Fast Adaptation
of Deep Networks", ICML 2017): x is the initialisation of a classifier (the backbone then a
linear layer), y per-task copies of its weights started at x (``init_lower``), adapted on the
support set; the outer loss is the query cross-entropy of the adapted weights.

Data: any ``ROOT/<Alphabet>/<character>/*.png`` folder (real Omniglot when the user has it),
by default the font-rendered glyph set of :mod:`bilevel.data.glyphs`. Whole alphabets are split
into meta-train / meta-validation / meta-test classes. BatchNorm uses the statistics of the batch
it sees (one task's support set, or one task's query set: the transductive setting of MAML's
code) and keeps no running statistics.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vmap

from bilevel import distributed
from bilevel import tree as tr
from bilevel.checks import check_nonnegative
from bilevel.data.episodes import Episode, EpisodeSampler, split_classes
from bilevel.data.glyphs import glyph_dataset
from bilevel.data.omniglot import load_omniglot
from bilevel.linalg import largest_eigenvalue
from bilevel.modules import functional, params
from bilevel.problem import Problem
from bilevel.solve import StepContext
from bilevel.tasks.base import Task, proximal_term, register_task, solver_defaults
from bilevel.tasks.resnet12 import WIDTHS, check_widths, resnet12
from bilevel.tree import Tree

FORMS = ("feature", "maml")
BACKBONES = ("conv4", "resnet12")
SPLITS = ("train", "val", "test")
EVAL_CHUNK = 20  # episodes per batched forward pass in evaluation

# Inner and outer settings per form (see docs/tasks/few_shot.md for the papers' values).
# ES methods: one direction shared by the meta-batch, radius 0.1 (Sow, Ji, Liang's settings)
_ES_DEFAULTS = {name: {"directions": 1, "radius": 0.1} for name in ("esj", "esj_s", "hozog")}
METHOD_DEFAULTS = {
    "feature": {"inner_steps": 5, "inner_lr": 0.1, **solver_defaults(solver_iters=5),
                **_ES_DEFAULTS},  # fmt: skip
    "maml": {"inner_steps": 1, "inner_lr": 0.4, **_ES_DEFAULTS},
}


def imaml_defaults(proximal: float) -> dict[str, object]:
    """iMAML (``proximal=λ``): an inner loop long enough to near y*(x), a GD step below 1/λ
    (the proximal term alone needs < 2/λ), 5 CG iterations."""
    return {"inner_steps": 10, "inner_lr": min(0.4, 1.0 / proximal),
            **solver_defaults(solver_iters=5)}  # fmt: skip


SOLVE_DEFAULTS = {"steps": 1000, "outer_optimizer": "adam", "outer_lr": 1e-3}


def conv4(hidden: int = 32, in_channels: int = 1) -> nn.Sequential:
    """Four blocks of conv3x3(hidden) - BatchNorm (batch statistics only) - ReLU - maxpool 2,
    then flatten (the conv-4 of Vinyals et al. 2016 and Finn et al. 2017)."""
    layers: list[nn.Module] = []
    for i in range(4):
        layers += [
            nn.Conv2d(in_channels if i == 0 else hidden, hidden, 3, padding=1),
            nn.BatchNorm2d(hidden, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
    return nn.Sequential(*layers, nn.Flatten())


def feature_size(hidden: int, image_size: int) -> int:
    """Length of conv-4's output for ``image_size`` x ``image_size`` inputs."""
    side = image_size
    for _ in range(4):
        side //= 2
    if side < 1:
        raise ValueError(
            f"image_size must be >= 16 for the backbone's four poolings, got {image_size}"
        )
    return hidden * side * side


def backbone_factory(
    backbone: str, hidden: int | None, widths: tuple[int, ...] | None, image_size: int
) -> tuple[Callable[[], nn.Sequential], int, dict[str, object]]:
    """Check the backbone's options and return its constructor, its feature length and the
    resolved options: conv-4 of ``hidden`` channels (default 32) or ResNet-12 of ``widths``
    channels (default 64-160-320-640). Each option belongs to one backbone; given to the
    other, it is an error rather than silently ignored."""
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, got {backbone!r}")
    if backbone == "conv4":
        if widths is not None:
            raise ValueError(
                "widths sets ResNet-12's channels (backbone='resnet12'); conv-4's is hidden"
            )
        hidden = 32 if hidden is None else hidden
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be a positive integer, got {hidden!r}")
        d = feature_size(hidden, image_size)
        return (lambda: conv4(hidden)), d, {"hidden": hidden, "widths": None}
    if hidden is not None:
        raise ValueError(
            "hidden sets conv-4's width (backbone='conv4'); ResNet-12's channels are widths"
        )
    widths = WIDTHS if widths is None else check_widths(widths)
    feature_size(1, image_size)  # the same four poolings: >= 16 px
    return (lambda: resnet12(widths=widths)), widths[-1], {"hidden": None, "widths": widths}


class EpisodeStream:
    """Endless seeded stream of meta-batches of episodes (an ``Episode`` of stacked tensors).

    Every ``iter()`` starts a fresh sampler from ``seed``, so the stream replays exactly: a
    resumed run (``Problem.skip_batches``) sees the same tasks as an uninterrupted one.
    """

    def __init__(
        self,
        make_sampler: Callable[[int], EpisodeSampler],
        meta_batch: int,
        seed: int,
        dtype: torch.dtype,
    ) -> None:
        self.make_sampler = make_sampler
        self.meta_batch = meta_batch
        self.seed = seed
        self.dtype = dtype

    def __iter__(self) -> Iterator[Episode]:
        sampler = self.make_sampler(self.seed)
        while True:
            yield _cast(sampler.sample_batch(self.meta_batch), self.dtype)


def _cast(episode: Episode, dtype: torch.dtype) -> Episode:
    """Images to ``dtype``; labels to the images' device (the sampler makes them on the CPU)."""
    device = episode.support_x.device
    return Episode(
        support_x=episode.support_x.to(dtype),
        support_y=episode.support_y.to(device),
        query_x=episode.query_x.to(dtype),
        query_y=episode.query_y.to(device),
    )


def _head_logits(feats: Tensor, head: Tree) -> Tensor:
    """Per-task linear heads: [tasks, n, d] features -> [tasks, n, n_way] logits."""
    return torch.baddbmm(head["bias"].unsqueeze(1), feats, head["weight"].transpose(1, 2))


def _descend(loss: Callable[[Tree], Tensor], y: Tree, steps: int, lr: float) -> Tree:
    """``steps`` plain gradient-descent steps of ``lr`` on ``loss`` from ``y``."""
    for _ in range(steps):
        y = tr.axpy(-lr, grad(loss)(y), y)
    return y


def head_curvature(feats: Tensor, labels: Tensor, n_way: int, iterations: int = 30) -> float:
    """Largest eigenvalue of the Hessian of Σ_tasks mean support CE of linear heads on
    ``feats`` [tasks, n, d], at zero heads (uniform predictions, where the CE curvature peaks),
    by power iteration (:func:`bilevel.linalg.largest_eigenvalue`). ResNet-12's 640 features
    make it a few hundred, conv-4's about 9, so the ResNet-12 default inner step is 1/L (one
    significant digit) instead of a constant."""

    def loss(head: Tree) -> Tensor:
        logits = _head_logits(feats, head)
        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        return ce.view(labels.shape).mean(1).sum()

    tasks, _, d = feats.shape
    zero = {"weight": feats.new_zeros(tasks, n_way, d), "bias": feats.new_zeros(tasks, n_way)}
    start = tr.randn_like(zero, generator=torch.Generator(device=feats.device).manual_seed(0))
    hvp = lambda v: torch.func.jvp(grad(loss), (zero,), (v,))[1]  # noqa: E731
    return float(largest_eigenvalue(hvp, start, iterations))


def _stack(tree: Tree, n: int) -> Tree:
    """``n`` copies of a tree along a new leading dim (differentiable: gradients sum)."""
    return {k: v.unsqueeze(0).repeat(n, *([1] * v.dim())) for k, v in tree.items()}


@dataclass
class FewShotSetup:
    """Everything the losses and the evaluation share: model, images, class splits, sizes and the
    inner settings used to adapt at evaluation time (``task.metadata["setup"]``)."""

    form: str
    model: nn.Module
    images: Tensor  # float32 [N, 1, H, W] on the task's device, ink = 1
    labels: np.ndarray  # int64 [N]
    splits: dict[str, np.ndarray]  # split -> class ids
    n_way: int
    k_shot: int
    n_query: int
    meta_batch: int
    feature_dim: int
    head_l2: float
    inner_steps: int
    inner_lr: float
    dtype: torch.dtype
    proximal: float = 0.0  # iMAML's λ (MAML form)

    def __post_init__(self) -> None:
        self.apply = functional(self.model)

    # ------------------------------------------------------------------ episodes
    def sampler(self, split: str, seed: int) -> EpisodeSampler:
        if split not in self.splits:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        return EpisodeSampler(
            self.images,
            self.labels,
            self.splits[split],
            self.n_way,
            self.k_shot,
            self.n_query,
            seed=seed,
        )

    def episodes(self, split: str, count: int, seed: int) -> Iterator[Episode]:
        """``count`` seeded episodes of ``split`` in stacked chunks of at most EVAL_CHUNK."""
        sampler = self.sampler(split, seed)
        for start in range(0, count, EVAL_CHUNK):
            yield _cast(sampler.sample_batch(min(EVAL_CHUNK, count - start)), self.dtype)

    # ------------------------------------------------------------------ losses
    def features(self, x: Tree, images: Tensor) -> Tensor:
        """[tasks, n, C, H, W] -> [tasks, n, d]: one batched pass, BatchNorm statistics per task."""
        return vmap(lambda im: self.apply(x, im))(images)

    def head_loss(self, feats: Tensor, labels: Tensor, head: Tree) -> Tensor:
        """Sum over tasks of support CE + ½·head_l2·‖W‖² (the sum gives each task's head its
        own gradient, so ``inner_lr`` is a per-task step whatever the meta-batch)."""
        logits = _head_logits(feats, head)
        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        return (
            ce.view(labels.shape).mean(1).sum() + 0.5 * self.head_l2 * head["weight"].square().sum()
        )

    def net_losses(self, y: Tree, images: Tensor, labels: Tensor) -> Tensor:
        """Per-task CE of per-task weights y (leading task dim), one vmapped pass."""
        return vmap(lambda p, im, lab: F.cross_entropy(self.apply(p, im), lab))(y, images, labels)

    def adaptation_loss(self, x: Tree, y: Tree, images: Tensor, labels: Tensor) -> Tensor:
        """MAML form: the summed support CE of per-task copies y, plus iMAML's λ/2‖y_t − x‖²
        per task when ``proximal`` = λ > 0."""
        loss = self.net_losses(y, images, labels).sum()
        if self.proximal:
            loss = loss + proximal_term(x, y, self.proximal)
        return loss

    def lower(self, x: Tree, y: Tree, batch: Episode) -> Tensor:
        """MAML form: the adaptation loss on the support set."""
        return self.adaptation_loss(x, y, batch.support_x, batch.support_y)

    def upper(self, x: Tree, y: Tree, batch: Episode) -> Tensor:
        """MAML form: the mean query CE of the adapted copies."""
        return self.net_losses(y, batch.query_x, batch.query_y).mean()

    # feature form: the losses see x only through the features of the episode's images, declared
    # as the problem's representations, so they are computed once per outer step
    def support_features(self, x: Tree, batch: Episode) -> Tensor:
        return self.features(x, batch.support_x)

    def query_features(self, x: Tree, batch: Episode) -> Tensor:
        return self.features(x, batch.query_x)

    def head_lower(self, support: Tensor, y: Tree, batch: Episode) -> Tensor:
        return self.head_loss(support, batch.support_y, y)

    def head_upper(self, query: Tensor, y: Tree, batch: Episode) -> Tensor:
        logits = _head_logits(query, y)
        return F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten())

    def zero_heads(self, x: Tree, tasks: int) -> Tree:
        like = next(iter(x.values()))
        return {
            "weight": like.new_zeros(tasks, self.n_way, self.feature_dim),
            "bias": like.new_zeros(tasks, self.n_way),
        }

    def init_lower(self, x: Tree) -> Tree:
        """Zero heads (feature form) or per-task copies of x (MAML), for the tasks of one
        meta-batch this process holds (all of them, or its share under torch.distributed)."""
        tasks = self.meta_batch // distributed.world_size()
        if self.form == "feature":
            return self.zero_heads(x, tasks)
        return _stack(x, tasks)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def accuracy(self, x: Tree, episode: Episode, inner_steps: int, inner_lr: float) -> Tensor:
        """Query accuracy per episode after ``inner_steps`` plain GD steps of ``inner_lr`` on
        the inner loss from the form's start (zero heads / the initialisation x)."""
        x = {k: v.detach() for k, v in x.items()}
        tasks = episode.support_y.shape[0]
        if self.form == "feature":
            support = self.features(x, episode.support_x)
            head = _descend(
                lambda h: self.head_loss(support, episode.support_y, h),
                self.zero_heads(x, tasks),
                inner_steps,
                inner_lr,
            )
            logits = _head_logits(self.features(x, episode.query_x), head)
        else:
            y = _descend(
                lambda p: self.adaptation_loss(x, p, episode.support_x, episode.support_y),
                _stack(x, tasks),
                inner_steps,
                inner_lr,
            )
            logits = vmap(self.apply)(y, episode.query_x)
        return (logits.argmax(-1) == episode.query_y).to(torch.float64).mean(1)

    def mean_accuracy(
        self, x: Tree, split: str, episodes: int, seed: int, inner_steps: int, inner_lr: float
    ) -> tuple[float, float]:
        """Mean query accuracy (percent) over seeded episodes of ``split`` and its 95% interval
        half-width 1.96·s/√n."""
        if episodes < 2:
            raise ValueError(f"episodes must be >= 2 for an interval, got {episodes}")
        acc = torch.cat(
            [
                self.accuracy(x, e, inner_steps, inner_lr)
                for e in self.episodes(split, episodes, seed)
            ]
        ).cpu()
        return 100 * float(acc.mean()), 100 * 1.96 * float(acc.std()) / math.sqrt(episodes)


def evaluate(
    task: Task,
    x: Tree,
    episodes: int = 600,
    split: str = "test",
    seed: int = 0,
    inner_steps: int | None = None,
    inner_lr: float | None = None,
) -> tuple[float, float]:
    """Accuracy (percent) of outer variable ``x`` over ``episodes`` seeded episodes of ``split``
    and its 95% confidence half-width: the standard 600-episode meta-test protocol.

    Each episode is adapted by plain gradient descent (``inner_steps`` steps of ``inner_lr``;
    default the task's method defaults) from zero heads (feature form) or from x (MAML).
    """
    setup: FewShotSetup = task.metadata["setup"]
    return setup.mean_accuracy(
        x,
        split,
        episodes,
        seed,
        setup.inner_steps if inner_steps is None else inner_steps,
        setup.inner_lr if inner_lr is None else inner_lr,
    )


@register_task("few_shot")
def few_shot(
    form: str = "feature",
    root: str | Path | None = None,
    n_way: int = 5,
    k_shot: int = 5,
    n_query: int = 15,
    meta_batch: int = 4,
    backbone: str = "conv4",
    hidden: int | None = None,
    widths: tuple[int, int, int, int] | None = None,
    head_l2: float = 0.5,
    n_alphabets: int = 20,
    n_characters: int = 20,
    n_drawings: int = 20,
    image_size: int = 28,
    split_sizes: tuple[float, float, float] = (0.6, 0.2, 0.2),
    eval_episodes: int = 100,
    seed: int = 0,
    data_seed: int = 0,
    proximal: float = 0.0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Task:
    """N-way K-shot classification as a bilevel task (see the module docstring for the forms).

    ``root``: an Omniglot-layout folder; ``None`` renders (once, cached) the glyph dataset of
    ``n_alphabets`` x ``n_characters`` x ``n_drawings`` with ``data_seed``. Alphabets are split
    into meta-train / meta-validation / meta-test by ``split_sizes`` (fractions or counts of
    alphabets, seeded by ``data_seed``). ``seed`` fixes the initialisation and the stream of
    meta-train batches (``task_data``; ``meta_batch`` episodes per outer step). The callback
    ``val_accuracy`` adapts on ``eval_episodes`` fixed meta-validation episodes (seeded by
    ``data_seed``, so runs with different ``seed`` compare on the same episodes).

    ``proximal=λ > 0`` (MAML form) is iMAML (Rajeswaran, Finn, Kakade, Levine, "Meta-Learning
    with Implicit Gradients", NeurIPS 2019): the lower loss adds λ/2‖y_t − x‖² per task, so
    y*(x) depends on x and implicit methods (cg) differentiate it; evaluation adapts with the
    same term, and the defaults are :func:`imaml_defaults`.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    make_features, d, sizes = backbone_factory(backbone, hidden, widths, image_size)
    if meta_batch < 1 or eval_episodes < 2 or head_l2 < 0:
        raise ValueError("need meta_batch >= 1, eval_episodes >= 2, head_l2 >= 0")
    check_nonnegative("proximal", proximal)
    if proximal and form != "maml":
        raise ValueError("proximal (iMAML) needs form='maml': the feature form's heads start at 0")
    if root is None:
        root = glyph_dataset(
            n_alphabets=n_alphabets,
            n_characters=n_characters,
            n_drawings=n_drawings,
            image_size=image_size,
            seed=data_seed,
        )
    data = load_omniglot(root, image_size=image_size, cache=True)
    if len(split_sizes) != len(SPLITS):
        raise ValueError(f"split_sizes needs 3 entries (train, val, test), got {split_sizes!r}")
    parts = split_classes(data.alphabet_of_class, split_sizes, seed=data_seed)
    splits = dict(zip(SPLITS, parts, strict=True))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        features = make_features()
        if form == "maml":
            classifier = nn.Linear(d, n_way)
            model = nn.Sequential(OrderedDict(features=features, classifier=classifier))
        else:
            model = features
    model = model.to(dtype=dtype, device=device)
    defaults = dict(imaml_defaults(proximal) if proximal else METHOD_DEFAULTS[form])
    setup = FewShotSetup(
        form=form,
        model=model,
        images=torch.from_numpy(data.images).unsqueeze(1).to(device),
        labels=data.labels,
        splits=splits,
        n_way=n_way,
        k_shot=k_shot,
        n_query=n_query,
        meta_batch=meta_batch,
        feature_dim=d,
        head_l2=head_l2,
        inner_steps=defaults["inner_steps"],
        inner_lr=defaults["inner_lr"],
        dtype=dtype,
        proximal=proximal,
    )
    for split in SPLITS:  # fail now, not at the first evaluation, if a split is too small
        try:
            setup.sampler(split, 0)
        except ValueError as err:
            raise ValueError(
                f"{split} split: {err} (lower n_way / k_shot / n_query, or use more alphabets, "
                "characters or drawings)"
            ) from err
    stream = EpisodeStream(lambda s: setup.sampler("train", s), meta_batch, seed, dtype)
    curvature = None
    if backbone == "resnet12":  # a step scaled to the stiffer head problem (head_curvature)
        backbone_net = model if form == "feature" else model.features
        apply, weights, first = functional(backbone_net), params(backbone_net), next(iter(stream))
        with torch.no_grad():
            feats = vmap(lambda images: apply(weights, images))(first.support_x)
        curvature = head_curvature(feats, first.support_y, n_way) + head_l2
        defaults["inner_lr"] = setup.inner_lr = float(f"{1 / curvature:.1g}")
    if form == "feature":
        losses = {
            "upper": setup.head_upper,
            "lower": setup.head_lower,
            "upper_representation": setup.query_features,
            "lower_representation": setup.support_features,
        }
    else:
        losses = {"upper": setup.upper, "lower": setup.lower}
    problem = Problem(
        **losses, task_data=stream, init_lower=setup.init_lower
    )

    def val_accuracy(ctx: StepContext) -> dict[str, float]:
        mean, _ = setup.mean_accuracy(
            ctx.x, "val", eval_episodes, data_seed, setup.inner_steps, setup.inner_lr
        )
        return {"val_accuracy": mean}

    x0 = params(model)
    alphabets = {s: sorted({int(data.alphabet_of_class[c]) for c in splits[s]}) for s in SPLITS}
    return Task(
        name="few_shot",
        problem=problem,
        x0=x0,
        y0=None,
        callbacks=[val_accuracy],
        metadata={
            "form": form,
            "root": str(root),
            "n_way": n_way,
            "k_shot": k_shot,
            "n_query": n_query,
            "meta_batch": meta_batch,
            "backbone": backbone,
            **sizes,
            "backbone_parameters": sum(p.numel() for p in features.parameters()),
            "head_curvature": curvature,
            "head_l2": head_l2,
            "image_size": image_size,
            "classes": {s: len(splits[s]) for s in SPLITS},
            "alphabets": {s: [data.alphabets[a] for a in alphabets[s]] for s in SPLITS},
            "eval_episodes": eval_episodes,
            "seed": seed,
            "data_seed": data_seed,
            "proximal": proximal,
            "setup": setup,
        },
        method_defaults=dict(defaults),
        solve_defaults=dict(SOLVE_DEFAULTS),
    )

"""Few-shot episodes: disjoint class splits and a seeded N-way K-shot sampler.

Meta-learning trains on tasks drawn from some classes and tests on tasks from classes never
seen, so :func:`split_classes` splits whole classes (or whole alphabets, as Omniglot's
background/evaluation halves do) and :class:`EpisodeSampler` draws tasks from one split.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from numbers import Integral
from typing import NamedTuple

import numpy as np
import torch


class Episode(NamedTuple):
    """One task (or a stack of tasks, with a leading meta-batch dim) of support and query sets."""

    support_x: torch.Tensor  # float32 [N*K, C, H, W]
    support_y: torch.Tensor  # int64 [N*K], values 0..N-1, K of each
    query_x: torch.Tensor  # float32 [N*Q, C, H, W]
    query_y: torch.Tensor  # int64 [N*Q]


def _group_of_class(groups: int | Sequence[int] | np.ndarray) -> np.ndarray:
    """Group id per class: ``n`` means classes 0..n-1 each form their own group."""
    if isinstance(groups, Integral):
        if groups < 1:
            raise ValueError(f"split_classes: need at least one class, got {groups}")
        return np.arange(int(groups))
    ids = np.asarray(groups)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError("split_classes: groups must be a class count or a 1-D int array")
    return ids.astype(np.int64)


def _split_counts(sizes: Sequence[float], n: int) -> list[int]:
    """Turn split sizes (all-int counts, or fractions summing to 1) into counts summing to n."""
    if len(sizes) == 0:
        raise ValueError("split_classes: sizes is empty")
    if all(isinstance(s, Integral) and not isinstance(s, bool) for s in sizes):
        counts = [int(s) for s in sizes]
        if sum(counts) != n:
            raise ValueError(f"split_classes: counts {counts} sum to {sum(counts)}, need {n}")
    else:
        fractions = np.asarray(sizes, dtype=np.float64)
        if (fractions < 0).any() or abs(fractions.sum() - 1.0) > 1e-6:
            raise ValueError(f"split_classes: fractions {list(sizes)} must be >= 0 and sum to 1")
        raw = fractions * n
        floor = np.floor(raw).astype(np.int64)
        # Largest-remainder rounding: the leftover units go to the biggest fractional parts.
        leftover = n - int(floor.sum())
        floor[np.argsort(floor - raw, kind="stable")[:leftover]] += 1
        counts = floor.tolist()
    if min(counts) < 1:
        raise ValueError(f"split_classes: sizes {list(sizes)} leave an empty split of {n} units")
    return counts


def split_classes(
    groups: int | Sequence[int] | np.ndarray, sizes: Sequence[float], seed: int = 0
) -> list[np.ndarray]:
    """Randomly partition classes into disjoint splits; returns sorted class ids per split.

    ``groups`` is either the number of classes (each class is a unit) or, per class, the id of
    its group (e.g. ``OmniglotData.alphabet_of_class``), in which case whole groups are
    assigned so no alphabet straddles two splits. ``sizes`` are counts of units (all ints,
    summing to the number of units) or fractions summing to 1.
    """
    group_of_class = _group_of_class(groups)
    units = np.unique(group_of_class)
    counts = _split_counts(sizes, len(units))
    shuffled = np.random.default_rng(seed).permutation(units)
    parts = np.split(shuffled, np.cumsum(counts)[:-1])
    return [np.flatnonzero(np.isin(group_of_class, part)) for part in parts]


class EpisodeSampler:
    """Draws N-way K-shot episodes from ``classes``, reproducibly from its own ``seed``.

    ``images`` is a numpy array or tensor ``[M, H, W]`` (a channel dim of 1 is added) or
    ``[M, C, H, W]``; uint8 pixels are scaled to [0, 1], other dtypes cast to float32.
    ``labels`` gives each image's class; ``classes=None`` uses every label present.
    Support and query images are grouped by class, episode label ``i`` being the i-th drawn class.
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor | Sequence[int],
        classes: np.ndarray | Sequence[int] | None,
        n_way: int,
        k_shot: int,
        n_query: int,
        seed: int = 0,
    ) -> None:
        labels = np.asarray(labels)
        if images.ndim not in (3, 4):
            raise ValueError(f"images must be [M, H, W] or [M, C, H, W], got shape {images.shape}")
        if labels.shape != (len(images),):
            raise ValueError(f"labels shape {labels.shape} does not match {len(images)} images")
        if n_way < 1 or k_shot < 1 or n_query < 0:
            raise ValueError(
                f"need n_way >= 1, k_shot >= 1, n_query >= 0; got {n_way}, {k_shot}, {n_query}"
            )
        self.classes = self._check_classes(labels, classes, n_way)
        self.n_way, self.k_shot, self.n_query = n_way, k_shot, n_query
        self._images = images
        self._index = self._index_classes(labels, self.classes, k_shot + n_query)
        self._rng = np.random.default_rng(seed)

    @staticmethod
    def _check_classes(
        labels: np.ndarray, classes: np.ndarray | Sequence[int] | None, n_way: int
    ) -> np.ndarray:
        """Sorted class ids to sample from; at least ``n_way`` of them, no duplicates."""
        chosen = np.unique(labels) if classes is None else np.asarray(classes).reshape(-1)
        if len(np.unique(chosen)) != len(chosen):
            raise ValueError("classes contains duplicate ids")
        if len(chosen) < n_way:
            raise ValueError(f"n_way={n_way} but only {len(chosen)} classes are available")
        return np.sort(chosen)

    @staticmethod
    def _index_classes(
        labels: np.ndarray, classes: np.ndarray, needed: int
    ) -> dict[int, np.ndarray]:
        """Image indices of each class, failing if any class has fewer than ``needed``."""
        order = np.argsort(labels, kind="stable")
        sorted_labels = labels[order]
        index: dict[int, np.ndarray] = {}
        for c in classes:
            lo = np.searchsorted(sorted_labels, c, side="left")
            hi = np.searchsorted(sorted_labels, c, side="right")
            index[int(c)] = order[lo:hi]
        short = [f"class {c} has {len(idx)}" for c, idx in index.items() if len(idx) < needed]
        if short:
            more = f" (+{len(short) - 5} more classes)" if len(short) > 5 else ""
            raise ValueError(
                f"each class needs k_shot + n_query = {needed} examples, but "
                f"{', '.join(short[:5])}{more}"
            )
        return index

    def _take(self, idx: np.ndarray) -> torch.Tensor:
        """Images at ``idx`` as a float32 tensor [len(idx), C, H, W]."""
        if isinstance(self._images, torch.Tensor):
            x = self._images[torch.from_numpy(idx)]
        else:
            x = torch.from_numpy(np.ascontiguousarray(self._images[idx]))
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return x.unsqueeze(1) if x.ndim == 3 else x

    def sample(self) -> Episode:
        """Draw one episode: ``n_way`` distinct classes, ``k_shot + n_query`` images of each."""
        drawn = self._rng.choice(self.classes, size=self.n_way, replace=False)
        per_class = self.k_shot + self.n_query
        picks = np.stack(
            [self._rng.choice(self._index[int(c)], size=per_class, replace=False) for c in drawn]
        )
        support_x = self._take(picks[:, : self.k_shot].reshape(-1))
        ways = torch.arange(self.n_way, device=support_x.device)  # labels beside the images
        return Episode(
            support_x=support_x,
            support_y=ways.repeat_interleave(self.k_shot),
            query_x=self._take(picks[:, self.k_shot :].reshape(-1)),
            query_y=ways.repeat_interleave(self.n_query),
        )

    def sample_batch(self, meta_batch: int) -> Episode:
        """Draw ``meta_batch`` episodes stacked along a new leading dim."""
        if meta_batch < 1:
            raise ValueError(f"meta_batch must be >= 1, got {meta_batch}")
        episodes = [self.sample() for _ in range(meta_batch)]
        return Episode(*(torch.stack(parts) for parts in zip(*episodes, strict=True)))

    def __iter__(self) -> Iterator[Episode]:
        """Endless stream of episodes (continues this sampler's random stream)."""
        while True:
            yield self.sample()

"""Tests for class splitting and the N-way K-shot episode sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bilevel.data.episodes import Episode, EpisodeSampler, split_classes


def toy_data(num_classes: int = 8, per_class: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [M, 4, 5] whose every pixel encodes the image index; labels by class."""
    m = num_classes * per_class
    images = np.broadcast_to(np.arange(m, dtype=np.uint8)[:, None, None], (m, 4, 5)).copy()
    labels = np.random.default_rng(1).permutation(np.repeat(np.arange(num_classes), per_class))
    return images, labels


# ---------------------------------------------------------------- split_classes


@pytest.mark.parametrize("sizes", [(0.6, 0.2, 0.2), (12, 4, 4), [0.5, 0.5]])
def test_split_by_class_disjoint_and_cover(sizes: tuple) -> None:
    parts = split_classes(20, sizes, seed=3)
    assert len(parts) == len(sizes)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(20))
    if all(isinstance(s, int) for s in sizes):
        assert [len(p) for p in parts] == list(sizes)
    for p in parts:
        assert p.dtype.kind == "i" and np.all(np.diff(p) > 0)


def test_split_fraction_rounding_sums() -> None:
    assert [len(p) for p in split_classes(10, (1 / 3, 1 / 3, 1 / 3), seed=0)] in (
        [4, 3, 3], [3, 4, 3], [3, 3, 4],
    )  # fmt: skip


def test_split_by_alphabet_keeps_alphabets_whole() -> None:
    alphabet_of_class = np.repeat(np.arange(5), [3, 1, 4, 2, 5])  # 15 classes, 5 alphabets
    parts = split_classes(alphabet_of_class, (3, 2), seed=7)
    assert sorted(np.concatenate(parts).tolist()) == list(range(15))
    alphabet_sets = [set(alphabet_of_class[p].tolist()) for p in parts]
    assert [len(a) for a in alphabet_sets] == [3, 2]
    assert not alphabet_sets[0] & alphabet_sets[1]


def test_split_seeded() -> None:
    a = split_classes(30, (0.5, 0.5), seed=1)
    b = split_classes(30, (0.5, 0.5), seed=1)
    c = split_classes(30, (0.5, 0.5), seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize(
    ("groups", "sizes", "problem"),
    [
        (10, (6, 3), r"counts \[6, 3\] sum to 9, need 10"),
        (10, (0.5, 0.4), "sum to 1"),
        (10, (1.2, -0.2), ">= 0"),
        (3, (0.9, 0.05, 0.05), "empty split"),
        (0, (1.0,), "at least one class"),
        (np.array([0.5, 1.0]), (1.0,), "1-D int array"),
        (4, (), "sizes is empty"),
    ],
)
def test_split_errors(groups: object, sizes: tuple, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        split_classes(groups, sizes, seed=0)


# ---------------------------------------------------------------- EpisodeSampler


def check_episode(ep: Episode, labels: np.ndarray, n: int, k: int, q: int) -> None:
    """Shapes, dtypes, relabelling, and that every image really belongs to its episode class."""
    assert ep.support_x.shape == (n * k, 1, 4, 5) and ep.query_x.shape == (n * q, 1, 4, 5)
    assert ep.support_x.dtype == torch.float32 and ep.support_y.dtype == torch.int64
    assert torch.bincount(ep.support_y, minlength=n).tolist() == [k] * n
    assert torch.bincount(ep.query_y, minlength=n).tolist() == [q] * n
    support_idx = (ep.support_x[:, 0, 0, 0] * 255).round().long().numpy()
    query_idx = (ep.query_x[:, 0, 0, 0] * 255).round().long().numpy()
    assert not set(support_idx) & set(query_idx)  # query never repeats a support image
    original = {}
    for idx, y in zip(
        np.concatenate([support_idx, query_idx]),
        torch.cat([ep.support_y, ep.query_y]).tolist(),
        strict=True,
    ):
        original.setdefault(y, set()).add(int(labels[idx]))
    assert all(len(c) == 1 for c in original.values())  # one original class per episode label
    assert len(set().union(*original.values())) == n  # n distinct classes


def test_sample_shapes_and_labels() -> None:
    images, labels = toy_data()
    sampler = EpisodeSampler(images, labels, None, n_way=5, k_shot=2, n_query=3, seed=0)
    for _ in range(10):
        check_episode(sampler.sample(), labels, 5, 2, 3)


def test_sample_respects_classes_and_channels() -> None:
    images, labels = toy_data()
    chw = torch.from_numpy(images).float().unsqueeze(1).repeat(1, 3, 1, 1) / 255
    sampler = EpisodeSampler(chw, labels, [1, 4, 6], n_way=3, k_shot=1, n_query=2, seed=0)
    ep = sampler.sample()
    assert ep.support_x.shape == (3, 3, 4, 5) and ep.query_x.shape == (6, 3, 4, 5)
    idx = (ep.query_x[:, 0, 0, 0] * 255).round().long().numpy()
    assert set(labels[idx].tolist()) == {1, 4, 6}


def test_same_seed_same_episodes_different_seed_differs() -> None:
    images, labels = toy_data()

    def episodes(seed: int) -> list[Episode]:
        sampler = EpisodeSampler(images, labels, None, 4, 1, 2, seed=seed)
        return [ep for ep, _ in zip(sampler, range(3), strict=False)]

    torch.manual_seed(0)
    np.random.seed(0)  # the global RNGs must not matter
    first = episodes(11)
    torch.manual_seed(1)
    np.random.seed(1)
    again, other = episodes(11), episodes(12)
    for a, b in zip(first, again, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert any(not torch.equal(a.query_x, b.query_x) for a, b in zip(first, other, strict=True))


def test_sample_batch() -> None:
    images, labels = toy_data()
    sampler = EpisodeSampler(images, labels, None, n_way=3, k_shot=2, n_query=1, seed=0)
    batch = sampler.sample_batch(4)
    assert batch.support_x.shape == (4, 6, 1, 4, 5) and batch.support_y.shape == (4, 6)
    assert batch.query_x.shape == (4, 3, 1, 4, 5) and batch.query_y.shape == (4, 3)
    for i in range(4):
        check_episode(Episode(*(t[i] for t in batch)), labels, 3, 2, 1)
    with pytest.raises(ValueError, match="meta_batch must be >= 1"):
        sampler.sample_batch(0)


def test_too_few_examples_message() -> None:
    images, labels = toy_data(per_class=6)
    expected = r"needs k_shot \+ n_query = 7 examples, but class 0 has 6"
    with pytest.raises(ValueError, match=expected):
        EpisodeSampler(images, labels, None, n_way=2, k_shot=2, n_query=5)
    with pytest.raises(ValueError, match="class 99 has 0"):
        EpisodeSampler(images, labels, [0, 99], n_way=2, k_shot=1, n_query=1)


def test_too_few_classes_and_bad_arguments() -> None:
    images, labels = toy_data()
    with pytest.raises(ValueError, match="n_way=5 but only 3 classes are available"):
        EpisodeSampler(images, labels, [0, 1, 2], n_way=5, k_shot=1, n_query=1)
    with pytest.raises(ValueError, match="duplicate"):
        EpisodeSampler(images, labels, [0, 0, 1], n_way=2, k_shot=1, n_query=1)
    with pytest.raises(ValueError, match="k_shot >= 1"):
        EpisodeSampler(images, labels, None, n_way=2, k_shot=0, n_query=1)
    with pytest.raises(ValueError, match="does not match"):
        EpisodeSampler(images, labels[:-1], None, n_way=2, k_shot=1, n_query=1)
    with pytest.raises(ValueError, match=r"\[M, H, W\] or \[M, C, H, W\]"):
        EpisodeSampler(images[:, 0], labels, None, n_way=2, k_shot=1, n_query=1)

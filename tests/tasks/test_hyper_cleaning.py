"""Hyper-cleaning task: the pinned protocol (split, corruption, determinism), the mini-batch
streams, the metrics and reference points, and a short solve that must detect corrupted labels."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

import bilevel as bl
from bilevel.data.errors import DataNotFoundError
from bilevel.data.idx import load_fashion_mnist
from bilevel.solve import StepContext
from bilevel.tasks.hyper_cleaning import (
    IndexBatches,
    detection_scores,
    hyper_cleaning,
    reference_points,
)


def _fashion_available() -> bool:
    try:
        load_fashion_mnist()
    except DataNotFoundError:
        return False
    return True


FASHION = pytest.param(
    "fashion_mnist",
    marks=pytest.mark.skipif(
        not _fashion_available(),
        reason="FashionMNIST not installed (apt install dataset-fashion-mnist)",
    ),
)
DATASETS = ["digits", FASHION]


@pytest.fixture(scope="module")
def digits():
    return hyper_cleaning(dataset="digits", corruption=0.5, seed=0)


@pytest.mark.parametrize("dataset", DATASETS)
def test_protocol_split_corruption_and_shapes(dataset):
    task = hyper_cleaning(dataset=dataset, corruption=0.8, n_train=500, n_val=300, seed=3)
    split = task.metadata["data"]
    d = 784 if dataset == "fashion_mnist" else 64
    assert split.train.shape == (500, d) and split.val.shape == (300, d)
    assert len(set(split.train_index.tolist()) & set(split.val_index.tolist())) == 0
    assert len(set(split.train_index.tolist())) == 500
    if dataset == "fashion_mnist":
        assert split.test.shape == (10000, d)
    else:
        assert len(split.test) == 1797 - 800
    for features in (split.train, split.val, split.test):
        assert features.min() >= 0 and features.max() <= 1
    wrong = split.train_labels != split.train_true
    assert int(wrong.sum()) == math.floor(0.8 * 500) == task.metadata["n_corrupted"]
    assert torch.equal(~wrong, split.clean)
    assert torch.equal(task.metadata["clean_indices"], torch.nonzero(split.clean).flatten())
    assert task.x0["x"].shape == (500,) and not task.x0["x"].any()
    assert task.y0["W"].shape == (10, d) and task.y0["b"].shape == (10,)


def test_digits_default_split_is_600_600(digits):
    meta = digits.metadata
    assert (meta["n_train"], meta["n_val"], meta["n_test"]) == (600, 600, 597)
    assert meta["n_corrupted"] == 300


def test_digits_sizes_given_are_used_not_replaced():
    # one size given: the other keeps the dataset's default (600), the rest is the test set
    meta = hyper_cleaning(dataset="digits", n_train=300, seed=0).metadata
    assert (meta["n_train"], meta["n_val"], meta["n_test"]) == (300, 600, 897)
    with pytest.raises(ValueError, match="n_train \\+ n_val = 1797 exceeds the 1796 images"):
        hyper_cleaning(dataset="digits", n_train=1197, seed=0)


def test_deterministic_given_seed():
    a, b, c = (hyper_cleaning(dataset="digits", seed=s) for s in (1, 1, 2))
    sa, sb, sc = (t.metadata["data"] for t in (a, b, c))
    for field in ("train", "train_labels", "val", "test", "clean", "train_index"):
        assert torch.equal(getattr(sa, field), getattr(sb, field))
    assert not torch.equal(sa.train_index, sc.train_index)
    assert not torch.equal(sa.clean, sc.clean)


def test_mlp_inner_model_is_seeded():
    a, b = (hyper_cleaning(dataset="digits", model="mlp", hidden=32, seed=4) for _ in range(2))
    assert {k: tuple(v.shape) for k, v in a.y0.items()} == {
        "0.weight": (32, 64),
        "0.bias": (32,),
        "2.weight": (10, 32),
        "2.bias": (10,),
    }
    assert all(torch.equal(a.y0[k], b.y0[k]) for k in a.y0)
    assert torch.isfinite(a.problem.lower_value(a.x0, a.y0))


def _take(stream, n):
    return [b.clone() for b in itertools.islice(iter(stream), n)]


def test_minibatch_streams_seeded_reshuffled_restartable():
    task = hyper_cleaning(dataset="digits", batch_size=256, seed=0)
    lower = task.problem.lower_data
    first, again = _take(lower, 6), _take(lower, 6)
    assert all(torch.equal(u, v) for u, v in zip(first, again, strict=True))
    assert all(len(b) == 256 for b in first)
    # 600 samples: two batches per epoch, each epoch a fresh permutation without repeats
    assert len(torch.cat(first[:2]).unique()) == 512
    assert not torch.equal(first[0], first[2])
    assert not torch.equal(_take(task.problem.upper_data, 1)[0], first[0])
    other = _take(IndexBatches(600, 256, seed=5), 1)[0]
    assert not torch.equal(other, first[0])
    # a batch of indices picks the matching per-sample weights in the lower loss
    x = {"x": torch.linspace(-2, 2, 600)}
    idx = first[0]
    full = hyper_cleaning(dataset="digits", seed=0, weight_decay=0.0)
    y = {"W": 0.1 * torch.ones(10, 64), "b": torch.zeros(10)}
    sub = full.metadata["data"]
    ce = torch.nn.functional.cross_entropy(
        torch.nn.functional.linear(sub.train[idx], y["W"], y["b"]),
        sub.train_labels[idx],
        reduction="none",
    )
    expected = torch.mean(torch.sigmoid(x["x"][idx]) * ce)
    got = hyper_cleaning(dataset="digits", seed=0, weight_decay=0.0, batch_size=256)
    assert torch.allclose(got.problem.lower(x, y, idx), expected)


def test_detection_scores():
    clean = torch.tensor([True, True, False, False])
    assert detection_scores(torch.tensor([1.0, 1.0, -1.0, -1.0]), clean)["f1"] == 1.0
    everything = detection_scores(torch.ones(4), clean)
    assert everything["precision"] == 0.5 and everything["recall"] == 1.0
    assert detection_scores(torch.zeros(4), clean)["f1"] == 0.0  # sigmoid(0) = 0.5 is not > 0.5


def test_short_cg_solve_detects_corrupted_labels(digits):
    method = bl.method("cg", **digits.method_options("cg"))
    result = bl.solve(
        digits.problem,
        digits.x0,
        digits.y0,
        method,
        steps=15,
        callbacks=digits.callbacks,
        log_every=15,
        **{k: v for k, v in digits.solve_defaults.items() if k != "steps"},
    )
    row = result.history[-1]
    assert {"test_accuracy", "val_loss", "f1", "precision", "recall"} <= row.keys()
    # the trivial "all clean" predictor has precision 1 - p = 0.5 and F1 = 2/3
    trivial = detection_scores(torch.ones(600), digits.metadata["data"].clean)["f1"]
    assert trivial == pytest.approx(2 / 3)
    assert row["f1"] > trivial + 0.1
    assert row["precision"] > 0.7


def test_reference_points_oracle_beats_naive():
    task = hyper_cleaning(dataset="digits", corruption=0.8, seed=0)
    ref = reference_points(task, steps=50)
    assert ref["oracle"] > ref["naive"] + 10
    assert ref == reference_points(task.metadata["data"], steps=50)


def test_missing_data_root_is_a_clear_error(tmp_path):
    with pytest.raises(DataNotFoundError, match="dataset-fashion-mnist") as err:
        hyper_cleaning(data_root=tmp_path)
    assert "digits" in str(err.value) and str(tmp_path) in str(err.value)


def test_unknown_options_are_rejected():
    with pytest.raises(ValueError, match="digits"):
        hyper_cleaning(dataset="mnist")
    with pytest.raises(ValueError, match="mlp"):
        hyper_cleaning(dataset="digits", model="resnet")


def test_refit_accuracy_depends_on_x_only_and_rewards_keeping_the_clean_samples():
    task = hyper_cleaning(dataset="digits", seed=0, refit_accuracy=True)
    metrics = task.callbacks[0]
    clean = task.metadata["data"].clean
    keep_clean = {"x": torch.where(clean, 10.0, -10.0)}
    keep_corrupted = {"x": -keep_clean["x"]}

    def logged(x, y):
        state = SimpleNamespace(y=y)
        return metrics(StepContext(step=1, x=x, state=state, hg=x, hg_x=x))

    trained = {k: torch.randn_like(v) for k, v in task.y0.items()}
    first, second = logged(keep_clean, task.y0), logged(keep_clean, trained)
    assert first["refit_test_accuracy"] == second["refit_test_accuracy"]
    assert first["test_accuracy"] != second["test_accuracy"]  # y_K's accuracy does follow y
    # weights on the clean samples fit far better than weights on the corrupted ones
    assert (
        first["refit_test_accuracy"] > logged(keep_corrupted, task.y0)["refit_test_accuracy"] + 30
    )
    assert "refit_test_accuracy" not in hyper_cleaning(dataset="digits", seed=0).callbacks[0](
        StepContext(
            step=1, x=keep_clean, state=SimpleNamespace(y=task.y0), hg=keep_clean, hg_x=keep_clean
        )
    )

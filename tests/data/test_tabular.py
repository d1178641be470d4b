"""Tests for the scikit-learn bundled datasets and standardization."""

from __future__ import annotations

import numpy as np
import pytest

from bilevel.data.tabular import load_sklearn, sklearn_names, standardize


@pytest.mark.parametrize(
    ("name", "shape", "num_classes"),
    [
        ("digits", (1797, 64), 10),
        ("breast_cancer", (569, 30), 2),
        ("wine", (178, 13), 3),
        ("iris", (150, 4), 3),
    ],
)
def test_load_sklearn(name: str, shape: tuple[int, int], num_classes: int) -> None:
    X, y = load_sklearn(name)
    assert X.dtype == np.float32 and X.shape == shape
    assert y.dtype == np.int64 and y.shape == (shape[0],)
    assert set(np.unique(y).tolist()) == set(range(num_classes))


def test_name_normalization() -> None:
    X, _ = load_sklearn("Breast-Cancer")
    assert X.shape == (569, 30)


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(ValueError, match="unknown sklearn dataset 'mnist'") as info:
        load_sklearn("mnist")
    for name in sklearn_names():
        assert name in str(info.value)


def test_standardize_fits_on_train_only() -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(3.0, 2.0, (200, 4)).astype(np.float32)
    test = rng.normal(-5.0, 9.0, (50, 4)).astype(np.float32)
    train_s, test_s = standardize(train, test)
    assert train_s.dtype == np.float32 and test_s.dtype == np.float32
    np.testing.assert_allclose(train_s.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(train_s.std(0), 1.0, atol=1e-5)
    expected = (test - train.mean(0)) / train.std(0)
    np.testing.assert_allclose(test_s, expected, rtol=1e-5, atol=1e-5)


def test_standardize_constant_column_and_ints() -> None:
    train = np.array([[1, 5], [3, 5], [5, 5]])
    (out,) = standardize(train)
    assert out.dtype == np.float64 and np.isfinite(out).all()
    np.testing.assert_array_equal(out[:, 1], 0.0)


def test_standardize_errors() -> None:
    with pytest.raises(ValueError, match="empty"):
        standardize(np.zeros((0, 3)))
    with pytest.raises(ValueError, match=r"array 1 has feature shape \(2,\)"):
        standardize(np.ones((4, 3)), np.ones((4, 2)))

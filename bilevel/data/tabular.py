"""Small tabular classification datasets bundled with scikit-learn (no download needed)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sklearn import datasets

_LOADERS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "breast_cancer": datasets.load_breast_cancer,
    "digits": datasets.load_digits,
    "iris": datasets.load_iris,
    "wine": datasets.load_wine,
}


def sklearn_names() -> list[str]:
    """Names accepted by :func:`load_sklearn`."""
    return sorted(_LOADERS)


def load_sklearn(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Return features ``X`` (float32, [n, d]) and labels ``y`` (int64, [n]) of a bundled dataset.

    ``name`` is one of :func:`sklearn_names`; case and ``-`` vs ``_`` are ignored.
    """
    key = name.strip().lower().replace("-", "_")
    if key not in _LOADERS:
        raise ValueError(f"unknown sklearn dataset {name!r}; choose one of {sklearn_names()}")
    X, y = _LOADERS[key](return_X_y=True)
    return np.asarray(X, dtype=np.float32), np.asarray(y, dtype=np.int64)


def standardize(
    train: np.ndarray, *others: np.ndarray, eps: float = 1e-8
) -> tuple[np.ndarray, ...]:
    """Scale every array by the per-feature mean/std of ``train`` (so no test statistics leak).

    Features whose train std is below ``eps`` (constant columns) are only centred.
    Returns ``(train, *others)`` standardized; float inputs keep their dtype, ints become float.
    """
    if len(train) == 0:
        raise ValueError("standardize: train array is empty, cannot fit mean/std")
    for i, other in enumerate(others):
        if other.shape[1:] != train.shape[1:]:
            raise ValueError(
                f"standardize: array {i + 1} has feature shape {other.shape[1:]}, "
                f"train has {train.shape[1:]}"
            )
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std < eps, 1.0, std)
    return tuple(
        ((a - mean) / std).astype(np.result_type(a.dtype, np.float32), copy=False)
        for a in (train, *others)
    )

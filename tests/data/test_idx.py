"""Tests for the IDX / Fashion-MNIST reader."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from bilevel.data.errors import DataFormatError, DataNotFoundError
from bilevel.data.idx import DEFAULT_ROOT, ENV_VAR, load_fashion_mnist, load_idx, parse_idx

_TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int16): 0x0B, np.dtype(np.float32): 0x0D}
_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode ``array`` as IDX (big-endian dims and data)."""
    header = bytes([0, 0, _TYPE_CODES[array.dtype], array.ndim])
    dims = np.asarray(array.shape, dtype=">u4").tobytes()
    return header + dims + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` as IDX, gzipped when ``path`` ends in ``.gz``."""
    data = idx_bytes(array)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def fake_fashion(root: Path, gz: bool, n_train: int = 7, n_test: int = 3) -> dict[str, np.ndarray]:
    """Write a tiny Fashion-MNIST-shaped dataset into ``root``; return what was written."""
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for key, array in arrays.items():
        write_idx(root / (_STEMS[key] + (".gz" if gz else "")), array)
    return arrays


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(30, dtype=np.uint8).reshape(2, 3, 5),
        (np.arange(30) - 7).astype(np.int16).reshape(5, 6),
        np.linspace(-1, 1, 30, dtype=np.float32),
    ],
    ids=["uint8", "int16", "float32"],
)
def test_roundtrip(tmp_path: Path, suffix: str, array: np.ndarray) -> None:
    loaded = load_idx(write_idx(tmp_path / f"a.idx{suffix}", array))
    assert loaded.dtype == array.dtype and loaded.dtype.isnative
    np.testing.assert_array_equal(loaded, array)
    loaded.flat[0] = 1  # returned arrays are writable copies


@pytest.mark.parametrize("gz", [False, True])
def test_load_fashion_mnist_exact(tmp_path: Path, gz: bool) -> None:
    written = fake_fashion(tmp_path, gz=gz)
    loaded = load_fashion_mnist(tmp_path)
    assert set(loaded) == set(written)
    for key, array in written.items():
        assert loaded[key].dtype == np.uint8
        np.testing.assert_array_equal(loaded[key], array)


def test_truncated_file(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "x.idx", np.zeros((4, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataFormatError, match=r"x\.idx: truncated"):
        load_idx(path)


def test_truncated_gzip(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "x.idx.gz", np.arange(4000, dtype=np.uint8).reshape(40, 100))
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(DataFormatError, match=r"x\.idx\.gz"):
        load_idx(path)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\x00\x00", "too short"),
        (b"\x01\x00\x08\x01\x00\x00\x00\x00", "magic"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x00", "type code 0x07"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x01", "truncated header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x01\x05\x06", "trailing bytes"),
    ],
)
def test_bad_headers(data: bytes, problem: str) -> None:
    with pytest.raises(DataFormatError, match=problem):
        parse_idx(data, "blob")


def test_wrong_image_shape(tmp_path: Path) -> None:
    fake_fashion(tmp_path, gz=False)
    write_idx(tmp_path / _STEMS["test_images"], np.zeros((3, 28, 27), np.uint8))
    with pytest.raises(DataFormatError, match="t10k-images-idx3-ubyte: expected uint8 images"):
        load_fashion_mnist(tmp_path)


def test_label_count_mismatch(tmp_path: Path) -> None:
    fake_fashion(tmp_path, gz=False)
    write_idx(tmp_path / _STEMS["train_labels"], np.zeros(5, np.uint8))
    with pytest.raises(DataFormatError, match="train-labels-idx1-ubyte: expected 7 uint8 labels"):
        load_fashion_mnist(tmp_path)


def test_missing_dir_lists_tried_paths(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataNotFoundError) as info:
        load_fashion_mnist(missing)
    message = str(info.value)
    for stem in _STEMS.values():
        assert str(missing / stem) in message
        assert str(missing / f"{stem}.gz") in message
    assert "dataset-fashion-mnist" in message and ENV_VAR in message
    assert "\n" not in message
    assert isinstance(info.value, FileNotFoundError)


def test_partially_missing_lists_only_missing(tmp_path: Path) -> None:
    fake_fashion(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataNotFoundError) as info:
        load_fashion_mnist(tmp_path)
    assert "t10k-labels-idx1-ubyte.gz" in str(info.value)
    assert "train-images" not in str(info.value)


def test_env_var_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = fake_fashion(tmp_path / "fm", gz=True)
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "fm"))
    np.testing.assert_array_equal(load_fashion_mnist()["test_labels"], written["test_labels"])
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "empty"))
    with pytest.raises(DataNotFoundError, match=f"\\${ENV_VAR}"):
        load_fashion_mnist()


def test_argument_beats_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = fake_fashion(tmp_path / "arg", gz=False)
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "empty"))
    loaded = load_fashion_mnist(tmp_path / "arg")
    np.testing.assert_array_equal(loaded["train_images"], written["train_images"])


@pytest.mark.skipif(
    not DEFAULT_ROOT.is_dir(), reason=f"{DEFAULT_ROOT} absent (apt install dataset-fashion-mnist)"
)
def test_real_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    data = load_fashion_mnist()
    assert data["train_images"].shape == (60000, 28, 28)
    assert data["test_images"].shape == (10000, 28, 28)
    assert data["train_labels"].shape == (60000,) and data["test_labels"].shape == (10000,)
    for key in ("train_labels", "test_labels"):
        assert data[key].min() == 0 and data[key].max() == 9
    assert np.bincount(data["train_labels"]).tolist() == [6000] * 10
    assert np.bincount(data["test_labels"]).tolist() == [1000] * 10

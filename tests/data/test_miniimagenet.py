"""Tests for the mini-ImageNet pickle loader and its restricted unpickler."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from bilevel.data.errors import DataFormatError, DataNotFoundError
from bilevel.data.miniimagenet import (
    UnsafePickleError,
    load_mini_imagenet,
    load_mini_imagenet_pickle,
)


def fake_split(n_per_class: int = 3, size: int = 8) -> dict:
    """A small valid split: 2 classes, interleaved indices, index lists of mixed types."""
    images = np.random.default_rng(0).integers(0, 256, (2 * n_per_class, size, size, 3), np.uint8)
    return {
        "image_data": images,
        "class_dict": {
            "n02110063": list(range(1, 2 * n_per_class, 2)),
            "n01532829": np.arange(0, 2 * n_per_class, 2),
        },
    }


def dump(path: Path, obj: object, protocol: int = pickle.HIGHEST_PROTOCOL) -> Path:
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_load_valid_pickle(tmp_path: Path, protocol: int) -> None:
    split = fake_split()
    dump(tmp_path / "mini-imagenet-cache-val.pkl", split, protocol)
    data = load_mini_imagenet(tmp_path, "val")
    assert data.class_names == ["n01532829", "n02110063"]
    assert data.num_classes == 2
    np.testing.assert_array_equal(data.labels, [0, 1, 0, 1, 0, 1])
    assert data.labels.dtype == np.int64
    assert data.images.shape == (6, 3, 8, 8) and data.images.dtype == np.uint8
    np.testing.assert_array_equal(data.images, split["image_data"].transpose(0, 3, 1, 2))


class SystemCall:
    """Unpickling this runs ``os.system`` -- the classic pickle exploit."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


class WriteFile:
    """Unpickling this calls ``builtins.open`` to create a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("payload", ["system", "open"])
def test_malicious_pickle_refused(tmp_path: Path, payload: str) -> None:
    marker = tmp_path / "pwned"
    evil = SystemCall(f"touch {marker}") if payload == "system" else WriteFile(marker)
    split = fake_split()
    split["class_dict"]["n03"] = evil  # hidden inside an otherwise valid file
    path = dump(tmp_path / "evil.pkl", split)
    refused = r"refused to load pickle global \w+\.(system|open)"
    with pytest.raises(UnsafePickleError, match=refused):
        load_mini_imagenet_pickle(path)
    assert not marker.exists()


def test_unsafe_error_is_a_format_error() -> None:
    assert issubclass(UnsafePickleError, DataFormatError)


def test_truncated_pickle(tmp_path: Path) -> None:
    path = dump(tmp_path / "cut.pkl", fake_split())
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataFormatError, match=r"cut\.pkl: corrupt or truncated pickle"):
        load_mini_imagenet_pickle(path)


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda s: s.pop("class_dict"), "keys 'image_data' and 'class_dict'"),
        (lambda s: s.update(image_data=s["image_data"][..., 0]), "uint8 array"),
        (lambda s: s["class_dict"].update(n03=[5]), "shares images"),
        (lambda s: s["class_dict"].update(n02110063=[1, 3]), "1 images belong to no class"),
        (lambda s: s["class_dict"].update(n02110063=[1, 3, 6]), r"outside 0\.\.5"),
        (lambda s: s["class_dict"].update(n02110063=["a"]), "not integers"),
    ],
)
def test_bad_layout(tmp_path: Path, edit: Callable[[dict], object], problem: str) -> None:
    split = fake_split()
    edit(split)
    path = dump(tmp_path / "bad.pkl", split)
    with pytest.raises(DataFormatError, match=problem):
        load_mini_imagenet_pickle(path)


def test_missing_file_and_bad_split(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="mini-imagenet-cache-train.pkl"):
        load_mini_imagenet(tmp_path)
    with pytest.raises(ValueError, match="unknown mini-ImageNet split 'dev'"):
        load_mini_imagenet(tmp_path, "dev")

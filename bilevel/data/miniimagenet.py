"""Loader for mini-ImageNet pickles (``mini-imagenet-cache-{train,val,test}.pkl``).

Each pickle is ``{"image_data": uint8 [N, 84, 84, 3], "class_dict": {name: [indices]}}``.
Pickles can run arbitrary code when loaded, so they are read only through
:class:`RestrictedUnpickler`, which admits the few globals numpy arrays and plain containers need.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from bilevel.data.errors import DataError, DataFormatError, DataNotFoundError

SPLITS = ("train", "val", "test")

_NUMPY_GLOBALS = {
    # arrays, dtypes and scalars (numpy 1.x lives in numpy.core, numpy 2.x in numpy._core)
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # arrays at pickle protocol 5
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how protocol 2 stores an array's raw bytes
}
_PLAIN_BUILTINS = (
    "dict", "list", "tuple", "set", "frozenset",
    "bytes", "bytearray", "str", "int", "float", "complex", "bool",
)  # fmt: skip
_SAFE_GLOBALS = frozenset(_NUMPY_GLOBALS | {("builtins", n) for n in _PLAIN_BUILTINS})


class UnsafePickleError(DataFormatError):
    """A pickle asked for a global that the restricted unpickler does not admit."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals in ``_SAFE_GLOBALS``; anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        """Resolve an allowed global, or raise :class:`UnsafePickleError` naming it."""
        if (module, name) not in _SAFE_GLOBALS:
            raise UnsafePickleError(f"refused to load pickle global {module}.{name}")
        return super().find_class(module, name)


def safe_load_pickle(file: IO[bytes], name: str = "<stream>") -> Any:
    """Unpickle ``file`` with :class:`RestrictedUnpickler`; damage becomes DataFormatError."""
    try:
        return RestrictedUnpickler(file).load()
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise DataFormatError(f"{name}: corrupt or truncated pickle ({exc})") from exc


@dataclass(frozen=True)
class MiniImageNetData:
    """One mini-ImageNet split; class ``c`` is the synset ``class_names[c]``."""

    images: np.ndarray  # uint8 [N, 3, H, W] (a channels-first view of the pickled array)
    labels: np.ndarray  # int64 [N]
    class_names: list[str]  # sorted synset ids, e.g. "n01532829"

    @property
    def num_classes(self) -> int:
        """Number of classes in this split."""
        return len(self.class_names)


def _labels_from_class_dict(class_dict: dict, n: int, name: str) -> tuple[np.ndarray, list[str]]:
    """Turn ``{class: indices}`` into one label per image, checking indices cover 0..n-1 once."""
    class_names = sorted(class_dict)
    labels = np.full(n, -1, dtype=np.int64)
    for label, cls in enumerate(class_names):
        try:
            idx = np.asarray(class_dict[cls], dtype=np.int64).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise DataFormatError(f"{name}: class {cls!r} indices are not integers") from exc
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise DataFormatError(f"{name}: class {cls!r} has indices outside 0..{n - 1}")
        if (labels[idx] != -1).any():
            raise DataFormatError(f"{name}: class {cls!r} shares images with another class")
        labels[idx] = label
    if (labels == -1).any():
        raise DataFormatError(f"{name}: {(labels == -1).sum()} images belong to no class")
    return labels, class_names


def load_mini_imagenet_pickle(path: str | os.PathLike) -> MiniImageNetData:
    """Read one ``mini-imagenet-cache-*.pkl`` file safely and validate its layout."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"mini-ImageNet pickle {path} not found")
    with path.open("rb") as f:
        obj = safe_load_pickle(f, str(path))
    if not isinstance(obj, dict) or not {"image_data", "class_dict"} <= obj.keys():
        raise DataFormatError(f"{path}: expected a dict with keys 'image_data' and 'class_dict'")
    images, class_dict = obj["image_data"], obj["class_dict"]
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        raise DataFormatError(f"{path}: 'image_data' must be a uint8 array [N, H, W, 3]")
    if images.shape[-1] != 3:
        raise DataFormatError(f"{path}: 'image_data' has shape {images.shape}, expected [N,H,W,3]")
    if not isinstance(class_dict, dict) or not class_dict:
        raise DataFormatError(f"{path}: 'class_dict' must be a non-empty dict")
    if not all(isinstance(k, str) for k in class_dict):
        raise DataFormatError(f"{path}: 'class_dict' keys must be class-name strings")
    labels, class_names = _labels_from_class_dict(class_dict, len(images), str(path))
    return MiniImageNetData(images.transpose(0, 3, 1, 2), labels, class_names)


def load_mini_imagenet(root: str | os.PathLike, split: str = "train") -> MiniImageNetData:
    """Load ``root/mini-imagenet-cache-{split}.pkl`` for split ``train``, ``val`` or ``test``."""
    if split not in SPLITS:
        raise ValueError(f"unknown mini-ImageNet split {split!r}; choose one of {SPLITS}")
    return load_mini_imagenet_pickle(Path(root) / f"mini-imagenet-cache-{split}.pkl")

"""Reader for the IDX format of MNIST / Fashion-MNIST, plain or gzipped.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of
dimensions), then one big-endian uint32 per dimension, then the raw array data.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from bilevel.data.errors import DataFormatError, DataNotFoundError

ENV_VAR = "BILEVEL_FASHION_MNIST"
DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10

# IDX type code (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes into a native-byte-order array; ``name`` labels error messages."""
    if len(data) < 4:
        raise DataFormatError(f"{name}: {len(data)} bytes is too short for an IDX header")
    if data[0] or data[1]:
        magic = int.from_bytes(data[:4], "big")
        raise DataFormatError(f"{name}: bad IDX magic number 0x{magic:08x} (must start 0x0000)")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise DataFormatError(f"{name}: unknown IDX type code 0x{code:02x}")
    dtype = _IDX_DTYPES[code]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataFormatError(
            f"{name}: truncated header ({ndim} dims need {header} bytes, file has {len(data)})"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = header + math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "trailing bytes"
        raise DataFormatError(
            f"{name}: {problem}: shape {dims} needs {expected} bytes, file has {len(data)}"
        )
    array = np.frombuffer(data, dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))  # copy: writable and native-endian


def load_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gunzipped first when its name ends in ``.gz``)."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except FileNotFoundError as exc:
        raise DataNotFoundError(f"{path}: no such IDX file") from exc
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataFormatError(f"{path}: corrupt or truncated gzip stream ({exc})") from exc
    return parse_idx(data, str(path))


def _resolve_root(root: str | os.PathLike | None) -> tuple[Path, str]:
    """Pick the data folder (argument, then env var, then Debian default) and say where from."""
    if root is not None:
        return Path(root), "root argument"
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env), f"${ENV_VAR}"
    return DEFAULT_ROOT, "default location"


def _find_files(root: Path, source: str) -> dict[str, Path]:
    """Locate each Fashion-MNIST file as plain or ``.gz``; report every path tried if any lack."""
    found: dict[str, Path] = {}
    tried: list[Path] = []
    for key, stem in _FASHION_FILES.items():
        candidates = [root / stem, root / f"{stem}.gz"]
        match = next((p for p in candidates if p.is_file()), None)
        if match is None:
            tried.extend(candidates)
        else:
            found[key] = match
    if tried:
        raise DataNotFoundError(
            f"Fashion-MNIST not found in {root} ({source}); tried: "
            + ", ".join(map(str, tried))
            + f". Fix: `apt install dataset-fashion-mnist`, or set {ENV_VAR} (or pass root=)"
            " to a folder holding the four IDX files."
        )
    return found


def _check_split(images: np.ndarray, labels: np.ndarray, files: tuple[Path, Path]) -> None:
    """Validate one train/test pair: uint8 N×28×28 images, N labels in 0..9."""
    image_file, label_file = files
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise DataFormatError(
            f"{image_file}: expected uint8 images of shape (N, 28, 28), "
            f"got {images.dtype} {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.shape != (len(images),):
        raise DataFormatError(
            f"{label_file}: expected {len(images)} uint8 labels, got {labels.dtype} {labels.shape}"
        )
    if labels.size and labels.max() >= NUM_CLASSES:
        raise DataFormatError(f"{label_file}: label {labels.max()} outside 0..{NUM_CLASSES - 1}")


def load_fashion_mnist(root: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Load Fashion-MNIST as uint8 arrays: ``train_images``/``test_images`` (N×28×28), labels (N).

    ``root`` defaults to ``$BILEVEL_FASHION_MNIST``, else ``/usr/share/datasets/fashion-mnist``
    (Debian package ``dataset-fashion-mnist``). Nothing is ever downloaded.
    """
    files = _find_files(*_resolve_root(root))
    data = {key: load_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        _check_split(
            data[f"{split}_images"],
            data[f"{split}_labels"],
            (files[f"{split}_images"], files[f"{split}_labels"]),
        )
    return data

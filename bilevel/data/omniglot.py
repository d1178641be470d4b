"""Reader for the Omniglot folder layout ``ROOT/<Alphabet>/<character>/<drawing>.png``.

Works on either official half (``images_background`` or ``images_evaluation``) or any folder
laid out the same way. Decoding ~30k PNGs takes a while, so the result can be cached as ``.npz``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bilevel.data.errors import DataNotFoundError

_CACHE_VERSION = 1


@dataclass(frozen=True)
class OmniglotData:
    """Decoded Omniglot images; class ``c`` is character ``class_names[c]``."""

    images: np.ndarray  # float32 [N, H, W] in [0, 1]
    labels: np.ndarray  # int64 [N], class id per image
    class_names: list[str]  # "Alphabet/character", one per class
    alphabet_of_class: np.ndarray  # int64 [num_classes], index into ``alphabets``
    alphabets: list[str]

    @property
    def num_classes(self) -> int:
        """Number of characters (classes)."""
        return len(self.class_names)


def _subdirs(folder: Path) -> list[Path]:
    """Non-hidden subfolders, sorted by name so class ids are deterministic."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _pngs(folder: Path) -> list[Path]:
    """PNG files of one character folder, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png")


def _scan(root: Path) -> dict[str, dict[str, list[Path]]]:
    """Map alphabet -> character -> drawings, dropping folders without any PNG."""
    if not root.is_dir():
        raise DataNotFoundError(
            f"Omniglot root {root} is not a folder; pass the folder holding <Alphabet>/<character>/"
            "*.png (e.g. .../omniglot/images_background)"
        )
    layout: dict[str, dict[str, list[Path]]] = {}
    for alphabet in _subdirs(root):
        chars = {c.name: files for c in _subdirs(alphabet) if (files := _pngs(c))}
        if chars:
            layout[alphabet.name] = chars
    if not layout:
        raise DataNotFoundError(
            f"no Omniglot drawings under {root}: expected {root}/<Alphabet>/<character>/*.png"
        )
    return layout


def _fingerprint(root: Path, layout: dict[str, dict[str, list[Path]]], settings: str) -> str:
    """Hash of the relative file list, file sizes and decode settings; changes invalidate caches."""
    digest = hashlib.sha256(f"v{_CACHE_VERSION};{settings}".encode())
    for chars in layout.values():
        for files in chars.values():
            for path in files:
                entry = f"\n{path.relative_to(root).as_posix()}:{path.stat().st_size}"
                digest.update(entry.encode())
    return digest.hexdigest()


def _load_png(path: Path, image_size: int, invert: bool) -> np.ndarray:
    """One drawing as float32 [size, size] in [0, 1] (ink high when ``invert``)."""
    with Image.open(path) as img:
        gray = img.convert("L")
    if gray.size != (image_size, image_size):
        gray = gray.resize((image_size, image_size), Image.Resampling.LANCZOS)
    pixels = np.asarray(gray, dtype=np.float32) / 255.0
    return 1.0 - pixels if invert else pixels


def _decode(
    layout: dict[str, dict[str, list[Path]]], image_size: int, invert: bool
) -> OmniglotData:
    """Decode every drawing; classes are numbered in (alphabet, character) order."""
    images, labels, class_names, alphabet_of_class = [], [], [], []
    for a, (alphabet, chars) in enumerate(layout.items()):
        for character, files in chars.items():
            label = len(class_names)
            class_names.append(f"{alphabet}/{character}")
            alphabet_of_class.append(a)
            images.extend(_load_png(p, image_size, invert) for p in files)
            labels.extend([label] * len(files))
    return OmniglotData(
        images=np.stack(images).astype(np.float32, copy=False),
        labels=np.asarray(labels, dtype=np.int64),
        class_names=class_names,
        alphabet_of_class=np.asarray(alphabet_of_class, dtype=np.int64),
        alphabets=list(layout),
    )


def _read_cache(path: Path, fingerprint: str) -> OmniglotData | None:
    """Cached data if ``path`` holds a readable cache for this exact fingerprint, else None."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["fingerprint"]) != fingerprint:
                return None
            return OmniglotData(
                images=z["images"],
                labels=z["labels"],
                class_names=z["class_names"].tolist(),
                alphabet_of_class=z["alphabet_of_class"],
                alphabets=z["alphabets"].tolist(),
            )
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def _write_cache(path: Path, data: OmniglotData, fingerprint: str) -> None:
    """Write the cache atomically (temp file + rename); warn rather than fail if not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    fingerprint=np.str_(fingerprint),
                    images=data.images,
                    labels=data.labels,
                    class_names=np.asarray(data.class_names, dtype=str),
                    alphabet_of_class=data.alphabet_of_class,
                    alphabets=np.asarray(data.alphabets, dtype=str),
                )
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except OSError as exc:
        warnings.warn(f"could not write Omniglot cache {path}: {exc}", stacklevel=3)


def load_omniglot(
    root: str | os.PathLike,
    image_size: int = 28,
    invert: bool = True,
    cache: bool | str | os.PathLike = False,
) -> OmniglotData:
    """Load every drawing under ``root`` resized to ``image_size``², as float32 in [0, 1].

    ``invert=True`` maps Omniglot's black-on-white strokes to ink = 1, background = 0.
    ``cache=True`` stores an ``.npz`` inside ``root``; a path stores it there instead. A cache
    is reused only while the file list (names and sizes) and the decode settings are unchanged.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    root = Path(root)
    layout = _scan(root)
    if not cache:
        return _decode(layout, image_size, invert)
    settings = f"size={image_size};invert={invert}"
    default_name = f"omniglot_{image_size}px{'_inverted' if invert else ''}.npz"
    cache_path = root / default_name if cache is True else Path(cache)
    fingerprint = _fingerprint(root, layout, settings)
    data = _read_cache(cache_path, fingerprint)
    if data is None:
        data = _decode(layout, image_size, invert)
        _write_cache(cache_path, data, fingerprint)
    return data

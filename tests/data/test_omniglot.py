"""Tests for the Omniglot folder reader, on a tiny layout written with Pillow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import bilevel.data.omniglot as omniglot
from bilevel.data.errors import DataNotFoundError
from bilevel.data.omniglot import load_omniglot

ALPHABETS = ("Greek", "Armenian")  # written unsorted on purpose
CHARACTERS = ("character03", "character01", "character02")
DRAWINGS = 4


def gray_of(alphabet: int, character: int) -> int:
    """Distinct background gray per (sorted) class, so images can be traced to their class."""
    return 250 - 20 * (3 * alphabet + character)


def make_layout(root: Path, size: int = 20) -> Path:
    """2 alphabets x 3 characters x 4 drawings; each class has its own uniform gray."""
    for a, alphabet in enumerate(sorted(ALPHABETS)):
        for c, character in enumerate(sorted(CHARACTERS)):
            folder = root / alphabet / character
            folder.mkdir(parents=True)
            for d in range(DRAWINGS):
                Image.new("L", (size, size), gray_of(a, c)).save(folder / f"{d:04d}_{c:02d}.png")
    (root / ".hidden").mkdir()
    (root / "Greek" / "notes.txt").write_text("not a character folder")
    (root / "Greek" / "character01" / "readme.txt").write_text("not a drawing")
    return root


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count decodes, i.e. cache misses."""
    counted: list[int] = []
    real_decode = omniglot._decode

    def counting_decode(*args: object) -> omniglot.OmniglotData:
        counted.append(1)
        return real_decode(*args)

    monkeypatch.setattr(omniglot, "_decode", counting_decode)
    return counted


def test_layout_labels_and_names(tmp_path: Path) -> None:
    data = load_omniglot(make_layout(tmp_path), invert=False)
    assert data.images.shape == (24, 28, 28) and data.images.dtype == np.float32
    assert data.labels.dtype == np.int64
    np.testing.assert_array_equal(data.labels, np.repeat(np.arange(6), DRAWINGS))
    assert data.alphabets == ["Armenian", "Greek"]
    assert data.class_names == [f"{a}/character0{i}" for a in data.alphabets for i in (1, 2, 3)]
    np.testing.assert_array_equal(data.alphabet_of_class, [0, 0, 0, 1, 1, 1])
    assert data.num_classes == 6
    for label in range(6):
        expected = gray_of(label // 3, label % 3) / 255.0
        np.testing.assert_allclose(data.images[data.labels == label], expected, atol=1e-6)


def test_invert_makes_ink_high(tmp_path: Path) -> None:
    folder = tmp_path / "Alpha" / "character01"
    folder.mkdir(parents=True)
    img = Image.new("1", (105, 105), 1)  # Omniglot style: white background, black ink
    img.paste(0, (30, 30, 75, 75))
    img.save(folder / "a.png")
    inverted = load_omniglot(tmp_path, image_size=21).images[0]
    plain = load_omniglot(tmp_path, image_size=21, invert=False).images[0]
    assert inverted.shape == (21, 21)
    assert inverted[10, 10] == pytest.approx(1.0) and inverted[0, 0] == pytest.approx(0.0)
    np.testing.assert_allclose(inverted, 1.0 - plain)
    assert inverted.min() >= 0.0 and inverted.max() <= 1.0


def test_cache_reused_and_invalidated(tmp_path: Path, calls: list[int]) -> None:
    root = make_layout(tmp_path / "omniglot")
    first = load_omniglot(root, cache=True)
    assert len(calls) == 1 and list(root.glob("*.npz"))
    second = load_omniglot(root, cache=True)
    assert len(calls) == 1  # served from the cache
    np.testing.assert_array_equal(second.images, first.images)
    np.testing.assert_array_equal(second.labels, first.labels)
    assert second.class_names == first.class_names and second.alphabets == first.alphabets
    np.testing.assert_array_equal(second.alphabet_of_class, first.alphabet_of_class)

    new = root / "Greek" / "character04"
    new.mkdir()
    Image.new("L", (20, 20), 0).save(new / "0000.png")
    third = load_omniglot(root, cache=True)
    assert len(calls) == 2 and third.num_classes == 7 and len(third.images) == 25

    (new / "0000.png").unlink()
    fourth = load_omniglot(root, cache=True)
    assert len(calls) == 3 and fourth.num_classes == 6


def test_cache_at_path_tracks_settings(tmp_path: Path, calls: list[int]) -> None:
    root = make_layout(tmp_path / "omniglot")
    cache = tmp_path / "cache" / "omni.npz"
    load_omniglot(root, cache=cache)
    load_omniglot(root, cache=cache)
    assert len(calls) == 1 and cache.is_file() and not list(root.glob("*.npz"))
    small = load_omniglot(root, image_size=14, cache=cache)  # other settings: rebuilt
    assert len(calls) == 2 and small.images.shape == (24, 14, 14)


def test_corrupt_cache_is_rebuilt(tmp_path: Path) -> None:
    root = make_layout(tmp_path / "omniglot")
    cache = tmp_path / "omni.npz"
    cache.write_bytes(b"garbage")
    assert load_omniglot(root, cache=cache).images.shape == (24, 28, 28)
    assert load_omniglot(root, cache=cache).num_classes == 6


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="is not a folder"):
        load_omniglot(tmp_path / "absent")


def test_empty_layout(tmp_path: Path) -> None:
    (tmp_path / "Alpha" / "character01").mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match=r"<Alphabet>/<character>/\*\.png"):
        load_omniglot(tmp_path)


def test_bad_image_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_size"):
        load_omniglot(make_layout(tmp_path), image_size=0)

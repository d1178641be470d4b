"""Tests of the font-rendered Omniglot-like dataset, on a tiny build (a few seconds)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bilevel.data.contact_sheet import contact_sheet
from bilevel.data.glyphs import (
    FONT_PACKAGES,
    build_glyph_dataset,
    discover_fonts,
    glyph_dataset,
)

TINY = {"n_alphabets": 4, "n_characters": 5, "n_drawings": 6, "image_size": 28, "seed": 0}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not discover_fonts():
        pytest.skip(f"no usable fonts installed (apt-get install {FONT_PACKAGES})")
    return build_glyph_dataset(tmp_path_factory.mktemp("glyphs") / "tiny", **TINY)


def _images(root: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(root / "images.npz") as z:
        return z["images"], z["character"]


def test_layout_and_meta(tiny: Path) -> None:
    meta = json.loads((tiny / "meta.json").read_text())
    assert meta["generator"]["seed"] == 0 and meta["n_images"] == 4 * 5 * 6
    assert sorted(a["name"] for a in meta["alphabets"]) == sorted(
        p.name for p in tiny.iterdir() if p.is_dir()
    )
    code_points = set()
    for alphabet in meta["alphabets"]:
        assert len(alphabet["script"]) == 4  # an ISO 15924 code such as "Latn"
        folders = sorted(p.name for p in (tiny / alphabet["name"]).iterdir())
        assert folders == [f"character{c:02d}" for c in range(1, 6)]
        for character in alphabet["characters"]:
            code_points.add(character["code_point"])
            assert character["fonts"] and len(character["drawing_fonts"]) == 6
            pngs = sorted((tiny / alphabet["name"] / character["folder"]).glob("*.png"))
            assert [p.name for p in pngs] == [f"{k:02d}.png" for k in range(1, 7)]
            with Image.open(pngs[0]) as img:
                assert img.mode == "L" and img.size == (28, 28)
    assert len(code_points) == 20
    images, character = _images(tiny)
    assert images.shape == (120, 28, 28) and images.dtype == np.uint8
    first, last = meta["alphabets"][0]["name"], meta["alphabets"][-1]["name"]
    np.testing.assert_array_equal(
        np.asarray(Image.open(tiny / first / "character01/01.png")), images[0]
    )
    np.testing.assert_array_equal(
        np.asarray(Image.open(tiny / last / "character05/06.png")), images[-1]
    )
    assert np.bincount(character).tolist() == [6] * 20


def test_no_blank_or_clipped_images(tiny: Path) -> None:
    images, _ = _images(tiny)
    ink = 1.0 - images.astype(np.float64) / 255  # Omniglot convention: dark ink on white
    assert (ink.mean(axis=(1, 2)) > 0.005).all()  # a few pixels of ink at least
    ring = np.concatenate([ink[:, 0], ink[:, -1], ink[:, :, 0], ink[:, :, -1]], axis=1)
    assert ring.max() == 0.0


def test_same_seed_rebuild_is_identical(tiny: Path, tmp_path: Path) -> None:
    again = build_glyph_dataset(tmp_path / "again", **TINY, workers=1)  # serial vs default pool
    np.testing.assert_array_equal(_images(again)[0], _images(tiny)[0])
    meta, meta_again = (json.loads((r / "meta.json").read_text()) for r in (tiny, again))
    assert meta == meta_again


def test_characters_are_distinct(tiny: Path) -> None:
    """Leave-one-out 1-nearest-neighbour on raw pixels is far above chance (1 / 20)."""
    images, character = _images(tiny)
    x = images.reshape(len(images), -1).astype(np.float64) / 255
    dist = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    accuracy = (character[dist.argmin(1)] == character).mean()
    assert accuracy > 3 / 20, accuracy


def test_cache_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not discover_fonts():
        pytest.skip(f"no usable fonts installed (apt-get install {FONT_PACKAGES})")
    monkeypatch.setenv("BILEVEL_CACHE", str(tmp_path))
    start = time.perf_counter()
    first = glyph_dataset(**TINY)
    build_time, start = time.perf_counter() - start, time.perf_counter()
    second = glyph_dataset(**TINY)
    assert time.perf_counter() - start < build_time / 5  # a lookup, not a build
    assert second == first and first.parent == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary build left
    other = glyph_dataset(**{**TINY, "seed": 1}, cache_dir=tmp_path / "other")
    assert other.parent.name == "other" and other.name != first.name


def test_missing_fonts_error_names_packages(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="fonts-noto-core"):
        build_glyph_dataset(tmp_path / "out", font_dirs=[str(tmp_path)])


def test_contact_sheet(tiny: Path, tmp_path: Path) -> None:
    out = contact_sheet(tiny, tmp_path / "sheet.png", n_alphabets=3, n_characters=4, n_drawings=5)
    with Image.open(out) as img:
        assert img.width > 3 * 5 * 28 and img.height > 4 * 28

"""One-PNG overview of an Omniglot-layout dataset, to eyeball classes and their variation.

Works on any ``ROOT/<Alphabet>/<character>/<drawing>.png`` tree (ours or the real Omniglot).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BLOCKS_PER_ROW = 4  # alphabet blocks side by side
GAP = 2  # grey pixels between tiles, before zooming
LABEL = 14  # pixels above each block for the alphabet's name
BACKGROUND = 64


def contact_sheet(
    root: str | os.PathLike,
    out_png: str | os.PathLike,
    n_alphabets: int = 8,
    n_characters: int = 6,
    n_drawings: int = 6,
    zoom: int = 2,
) -> Path:
    """Write a grid of alphabet blocks (first alphabets by name): in each block a row per
    character and a column per drawing. Tiles are enlarged zoom times; returns out_png."""
    alphabets = _subdirs(Path(root))[:n_alphabets]
    if not alphabets:
        raise FileNotFoundError(f"no alphabet folders under {root}")
    blocks = [
        _block(a, n_characters, n_drawings).repeat(zoom, 0).repeat(zoom, 1) for a in alphabets
    ]
    cell_h = max(b.shape[0] for b in blocks) + LABEL + GAP * zoom
    cell_w = max(b.shape[1] for b in blocks) + GAP * zoom
    cols = min(BLOCKS_PER_ROW, len(blocks))
    rows = -(-len(blocks) // cols)
    sheet = np.full((cell_h * rows, cell_w * cols), BACKGROUND, np.uint8)
    for i, block in enumerate(blocks):
        y, x = (i // cols) * cell_h + LABEL, (i % cols) * cell_w
        sheet[y : y + block.shape[0], x : x + block.shape[1]] = block
    img = Image.fromarray(sheet)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for i, alphabet in enumerate(alphabets):
        draw.text(((i % cols) * cell_w + 2, (i // cols) * cell_h + 1), alphabet.name, 255, font)
    out_png = Path(out_png)
    img.save(out_png)
    return out_png


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _block(alphabet: Path, n_characters: int, n_drawings: int) -> np.ndarray:
    """One alphabet's tiles: a row per character, GAP-pixel grey lines between tiles."""
    rows = []
    for character in _subdirs(alphabet)[:n_characters]:
        files = sorted(character.glob("*.png"))[:n_drawings]
        tiles = [np.asarray(Image.open(f).convert("L")) for f in files]
        rows.append(
            np.concatenate([np.pad(t, ((0, GAP), (0, GAP)), constant_values=128) for t in tiles], 1)
        )
    width = max(r.shape[1] for r in rows)
    return np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]))) for r in rows], axis=0)

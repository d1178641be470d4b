"""An Omniglot-like few-shot dataset rendered offline from system fonts.

Omniglot cannot be downloaded here, so we draw our own: an alphabet is a Unicode script, a
character is one letter code point of it, and a drawing is one rendering of that letter with a
randomly chosen font covering it, a random pen width, affine jitter, a smooth elastic warp and
ragged edges, so that drawings of one character differ the way handwritten ones do.

Layout (Omniglot's): ``ROOT/<Alphabet>/characterNN/KK.png`` (NN, KK from 01), 8-bit grayscale in
**Omniglot's convention: dark ink (0) on white (255)**, so readers of Omniglot (e.g.
``bilevel.data.omniglot.load_omniglot`` with its default ``invert=True``) take it unchanged. Plus
``meta.json`` (alphabets, code points, fonts, generator parameters) and ``images.npz`` (the same
pixels as ``images`` N x s x s uint8, flat ``alphabet``/``character``/``drawing`` labels, classes
numbered in meta.json order). Every drawing is seeded from (seed, script, code point, drawing
index): a build is reproducible for a given font set, Pillow/FreeType and Python Unicode version.
Fonts: .ttf/.otf files, e.g. from the Debian packages in ``FONT_PACKAGES``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import unicodedata
import zlib
from collections import Counter
from contextlib import nullcontext
from functools import lru_cache
from itertools import islice
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import NamedTuple

import numpy as np
from fontTools import unicodedata as fontunicode
from fontTools.ttLib import TTFont
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FONT_PACKAGES = "fonts-noto-core fonts-ancient-scripts fonts-freefont-ttf fonts-dejavu-core"
DEFAULT_FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts")
FONT_SUFFIXES = (".ttf", ".otf")  # collections (.ttc) hold only CJK here, which we skip
GENERATOR_VERSION = 1
SKIP_NAME_PARTS = ("UI", "Symbols", "Math", "Music", "Emoji", "Numbers", "Unidings")
# Pseudo-scripts, the huge East Asian sets, and scripts too dense to read at 28 px.
SKIP_SCRIPTS = frozenset(
    ["Zyyy", "Zinh", "Zzzz", "Hani", "Hang", "Hira", "Kana", "Hrkt", "Bopo"]
    + ["Tang", "Kits", "Nshu", "Yiii", "Xsux", "Egyp", "Hluw", "Bamu"]
)
LETTERS = frozenset({"Lu", "Ll", "Lt", "Lo"})
MIN_CHARACTERS = 14  # an alphabet needs at least min(n_characters, this) usable letters
SCALE = 4  # drawings are made at SCALE x image_size, then box-downsampled
REF_SIZE = 160  # font size (px) of the reference rendering of each glyph
OUTLIER_CORR = 0.45  # a font's glyph must correlate this well with the other fonts' mean
NOTDEF_PROBE = 0x10FFFD  # a private-use code point no font maps: renders as .notdef
PROBES = 8  # letters per (font, script) rendered to find placeholder pictures
DISTORTION = {
    "fill": 0.72,  # glyph's longer side, as a fraction of the canvas
    "pen_width": (0.03, 0.065),  # stroke width range, fraction of the canvas
    "rotation_deg": 10.0,
    "shear": 0.15,
    "scale": (0.85, 1.08),
    "aspect": 0.08,  # +-log aspect ratio jitter
    "shift": 0.06,  # max translation, fraction of the canvas
    "warp": 0.035,  # elastic displacement std, fraction of the canvas
    "warp_grid": 4,  # control points per side of the elastic field
    "edge_noise": 0.2,  # std of the noise added before binarising at SCALE x
}

Table = dict[str, dict[int, list[str]]]  # script code -> letter code point -> font files


def discover_fonts(font_dirs: list[str] | None = None) -> Table:
    """Map script code -> letter code point -> font files whose cmap covers it (sorted paths)."""
    table: Table = {}
    for path in _font_files(font_dirs):
        try:
            font = TTFont(path, lazy=True)
            name = font["name"].getDebugName(4) or Path(path).stem
            cmap = font.getBestCmap() or {}
        except Exception:  # unreadable or exotic font files are simply not used
            continue
        if any(part in name for part in SKIP_NAME_PARTS):
            continue
        for cp in cmap:
            script = _letter_script(cp)
            if script:
                table.setdefault(script, {}).setdefault(cp, []).append(path)
    for chars in table.values():  # one case per pair: 'o' and 'O' look alike once size-normalised
        for cp in [cp for cp in chars if unicodedata.category(chr(cp)) == "Ll"]:
            upper = chr(cp).upper()
            if len(upper) == 1 and ord(upper) in chars:
                del chars[cp]
    return table


def _font_files(font_dirs: list[str] | None) -> list[str]:
    """All TrueType/OpenType files under the font directories, sorted for determinism."""
    files = []
    for root in font_dirs or DEFAULT_FONT_DIRS:
        for dirpath, _, names in os.walk(root):
            files += [os.path.join(dirpath, n) for n in names if n.lower().endswith(FONT_SUFFIXES)]
    return sorted(files)


def _letter_script(cp: int) -> str | None:
    """Script of a usable letter (no precomposed or compatibility forms), else None."""
    ch = chr(cp)
    if unicodedata.category(ch) not in LETTERS or unicodedata.decomposition(ch):
        return None
    script = fontunicode.script(ch)
    return None if script in SKIP_SCRIPTS else script


@lru_cache(maxsize=64)
def _font(path: str) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, REF_SIZE, layout_engine=ImageFont.Layout.BASIC)


@lru_cache(maxsize=2048)
def _glyph(cp: int, path: str, canvas: int) -> np.ndarray | None:
    """The glyph (uint8) centred on a canvas, longer side scaled to the fill; None if no ink."""
    font = _font(path)
    left, top, right, bottom = font.getbbox(chr(cp))
    if right <= left or bottom <= top:
        return None
    img = Image.new("L", (right - left + 8, bottom - top + 8))
    ImageDraw.Draw(img).text((4 - left, 4 - top), chr(cp), font=font, fill=255)
    box = img.getbbox()
    if box is None:
        return None
    img = img.crop(box)
    factor = DISTORTION["fill"] * canvas / max(img.size)
    w, h = max(1, round(img.width * factor)), max(1, round(img.height * factor))
    out = Image.new("L", (canvas, canvas))
    out.paste(img.resize((w, h), Image.Resampling.LANCZOS), ((canvas - w) // 2, (canvas - h) // 2))
    return np.asarray(out)


@lru_cache(maxsize=4096)
def _digest(cp: int, path: str, canvas: int) -> bytes | None:
    """Fingerprint of the rendered glyph, to spot identical pictures."""
    glyph = _glyph(cp, path, canvas)
    return None if glyph is None else hashlib.blake2b(glyph.tobytes(), digest_size=16).digest()


@lru_cache(maxsize=1024)
def _placeholders(path: str, letters: tuple[int, ...], canvas: int) -> frozenset[bytes]:
    """Pictures a font draws instead of a real letter: its .notdef box, and any picture repeated
    across a sample of its letters of the script (one font draws seven Coptic letters as a disc).
    """
    sample = letters[:: max(1, len(letters) // PROBES)][:PROBES]
    counts = Counter(_digest(cp, path, canvas) for cp in sample)
    repeated = {d for d, n in counts.items() if n > 1}
    return frozenset(repeated | {_digest(NOTDEF_PROBE, path, canvas)}) - {None}


def _usable_fonts(
    cp: int, paths: list[str], letters: dict[str, tuple[int, ...]], canvas: int
) -> list[str]:
    """Fonts that draw a real glyph for cp (letters: each font's letters of the script).

    Some fonts map a code point to the wrong letter (Cyrillic Н drawn as О, Λ as λ); with three
    or more fonts, one whose blurred glyph correlates poorly with the others' mean is dropped.
    """
    good = {}
    for path in paths:
        glyph = _glyph(cp, path, canvas)
        if glyph is None or glyph.mean() < 2.55:  # under 1% ink
            continue
        if _digest(cp, path, canvas) not in _placeholders(path, letters[path], canvas):
            good[path] = _feature(glyph)
    if len(good) < 3:
        return list(good)
    total = sum(good.values())
    return [p for p, f in good.items() if float(f @ _unit(total - f)) >= OUTLIER_CORR]


def _feature(glyph: np.ndarray) -> np.ndarray:
    """Blurred 16 x 16 view of a glyph, zero-mean and unit-norm, to compare fonts."""
    img = Image.fromarray(glyph).filter(ImageFilter.GaussianBlur(4))
    return _unit(np.asarray(img.resize((16, 16), Image.Resampling.BOX), dtype=np.float64).ravel())


def _unit(v: np.ndarray) -> np.ndarray:
    v = v - v.mean()
    return v / (np.linalg.norm(v) + 1e-12)


def _draw(glyph: np.ndarray, rng: np.random.Generator, image_size: int) -> np.ndarray:
    """One handwriting-like drawing of a glyph centred at SCALE x size: uint8, ink 0 on 255."""
    d, canvas = DISTORTION, glyph.shape[0]
    for _ in range(10):  # redraw if the jitter pushed ink into the outer ring of pixels
        img = _restroke(glyph, rng.uniform(*d["pen_width"]) * canvas)
        img = _warp(img, rng)
        noise = np.clip(rng.normal(0.0, d["edge_noise"], img.shape), -0.45, 0.45)
        img = (img + noise > 0.5).astype(np.float32)  # ragged edges, clean background
        if img[SCALE:-SCALE, SCALE:-SCALE].sum() == img.sum():
            break
    small = img.reshape(image_size, SCALE, image_size, SCALE).mean(axis=(1, 3))
    return np.round((1 - small) * 255).astype(np.uint8)


def _restroke(glyph: np.ndarray, width: float) -> np.ndarray:
    """Dilate or erode the strokes towards a pen width (stroke width ~ 2 * area / perimeter).

    Erosion keeps whatever it would delete entirely (the parts of an opening), so hairlines of
    high-contrast fonts survive while their thick stems get thinner.
    """
    ink = glyph > 127
    perimeter = (ink ^ np.roll(ink, 1, 0)).sum() + (ink ^ np.roll(ink, 1, 1)).sum()
    steps = round((width - 2 * ink.sum() / max(perimeter, 1)) / 2)
    img = glyph.astype(np.float32) / 255.0
    for _ in range(abs(steps)):
        if steps > 0:
            img = _rank3(img, np.maximum)
        else:
            eroded = _rank3(img, np.minimum)
            img = np.maximum(eroded, img - _rank3(eroded, np.maximum))
    return img


def _rank3(img: np.ndarray, op: np.ufunc) -> np.ndarray:
    """3 x 3 grey dilation (op=np.maximum) or erosion (np.minimum), done separably."""
    pad = np.pad(img, 1, mode="edge")
    rows = op(op(pad[:, :-2], pad[:, 1:-1]), pad[:, 2:])
    return op(op(rows[:-2], rows[1:-1]), rows[2:])


def _warp(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random affine jitter plus a smooth elastic displacement, in one bilinear resampling."""
    d, n = DISTORTION, img.shape[0]
    angle = np.deg2rad(rng.uniform(-d["rotation_deg"], d["rotation_deg"]))
    aspect = np.exp(rng.uniform(-d["aspect"], d["aspect"]))
    scale = rng.uniform(*d["scale"])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    shear = np.array([[1.0, rng.uniform(-d["shear"], d["shear"])], [0.0, 1.0]])
    inverse = np.linalg.inv(rot @ shear @ np.diag([scale * aspect, scale / aspect]))
    shift = rng.uniform(-d["shift"], d["shift"], 2) * n
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float64) - (n - 1) / 2
    src_x = inverse[0, 0] * (xs - shift[0]) + inverse[0, 1] * (ys - shift[1]) + (n - 1) / 2
    src_y = inverse[1, 0] * (xs - shift[0]) + inverse[1, 1] * (ys - shift[1]) + (n - 1) / 2
    for coord in (src_x, src_y):  # a coarse random field, smoothly upsampled
        coarse = rng.normal(0.0, d["warp"] * n, (d["warp_grid"], d["warp_grid"]))
        field = Image.fromarray(coarse.astype(np.float32), "F")
        coord += np.asarray(field.resize((n, n), Image.Resampling.BICUBIC))
    return _bilinear(img, src_x, src_y)


def _bilinear(img: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sample img at real coordinates (zero outside)."""
    pad = np.pad(img, 1)
    x, y = np.clip(x + 1, 0, pad.shape[1] - 1.001), np.clip(y + 1, 0, pad.shape[0] - 1.001)
    x0, y0 = x.astype(int), y.astype(int)
    fx, fy = x - x0, y - y0
    top = pad[y0, x0] * (1 - fx) + pad[y0, x0 + 1] * fx
    bottom = pad[y0 + 1, x0] * (1 - fx) + pad[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


class _Task(NamedTuple):
    """One script to try as an alphabet (a pool task)."""

    script: str
    candidates: list[tuple[int, list[str]]]  # (code point, fonts), in seeded random order
    n_characters: int
    n_drawings: int
    image_size: int
    seed: int


class _Alphabet(NamedTuple):
    script: str
    characters: list[tuple[int, list[str], list[int]]]  # (code point, fonts, font per drawing)
    images: np.ndarray  # uint8, characters x drawings x size x size


def _tasks(
    table: Table, n_characters: int, n_drawings: int, image_size: int, seed: int
) -> list[_Task]:
    """One task per script with enough letters, in a seeded order."""
    scripts = sorted(s for s, c in table.items() if len(c) >= min(n_characters, MIN_CHARACTERS))
    random.Random(seed).shuffle(scripts)
    tasks = []
    for script in scripts:
        cps = sorted(table[script])
        random.Random(f"{seed}:{script}").shuffle(cps)
        candidates = [(cp, table[script][cp]) for cp in cps]
        tasks.append(_Task(script, candidates, n_characters, n_drawings, image_size, seed))
    return tasks


def _render_alphabet(task: _Task) -> _Alphabet | None:
    """Take the first n_characters usable letters and draw them; None if too few are usable.

    A letter drawn exactly like an already chosen one (in some font) is skipped: homoglyphs
    such as Ð, Đ and Ɖ would make indistinguishable classes.
    """
    canvas = SCALE * task.image_size
    letters: dict[str, list[int]] = {}
    for cp, paths in sorted(task.candidates):
        for path in paths:
            letters.setdefault(path, []).append(cp)
    font_letters = {path: tuple(cps) for path, cps in letters.items()}
    chosen, taken = [], set()
    for cp, paths in task.candidates:
        fonts = _usable_fonts(cp, paths, font_letters, canvas)
        digests = {_digest(cp, path, canvas) for path in fonts}
        if fonts and not digests & taken:
            chosen.append((cp, fonts))
            taken |= digests
        if len(chosen) == task.n_characters:
            break
    if len(chosen) < min(task.n_characters, MIN_CHARACTERS):
        return None
    chosen.sort()
    size = task.image_size
    images = np.zeros((len(chosen), task.n_drawings, size, size), np.uint8)
    characters = []
    for c, (cp, fonts) in enumerate(chosen):
        picks = []
        for k in range(task.n_drawings):
            rng = np.random.default_rng([task.seed, zlib.crc32(task.script.encode()), cp, k])
            picks.append(int(rng.integers(len(fonts))))
            images[c, k] = _draw(_glyph(cp, fonts[picks[-1]], canvas), rng, size)
        characters.append((cp, fonts, picks))
    return _Alphabet(task.script, characters, images)


def build_glyph_dataset(
    root: str | os.PathLike,
    n_alphabets: int = 50,
    n_characters: int = 40,
    n_drawings: int = 20,
    image_size: int = 28,
    seed: int = 0,
    font_dirs: list[str] | None = None,
    workers: int | None = None,
) -> Path:
    """Render the dataset into root (created; must be empty or absent) and return root.

    Alphabets hold up to n_characters letters (at least min(n_characters, 14)); seed >= 0.
    workers: processes rendering alphabets in parallel (default: up to 2). meta.json is written
    last, so a root without it holds a failed or interrupted build.
    """
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty")
    table = discover_fonts(font_dirs)
    if not table:
        raise RuntimeError(
            f"No usable fonts under {', '.join(font_dirs or DEFAULT_FONT_DIRS)}. "
            f"Install the Debian font packages: apt-get install {FONT_PACKAGES}"
        )
    tasks = _tasks(table, n_characters, n_drawings, image_size, seed)
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    start = "fork" if "fork" in get_all_start_methods() else "spawn"
    root.mkdir(parents=True, exist_ok=True)
    alphabets, metas = [], []
    with get_context(start).Pool(workers) if workers > 1 else nullcontext() as pool:
        results = pool.imap(_render_alphabet, tasks) if pool else map(_render_alphabet, tasks)
        for alphabet in islice(filter(None, results), n_alphabets):  # leaves unneeded tasks undone
            metas.append(_write_pngs(root, alphabet))  # while the pool renders the next ones
            alphabets.append(alphabet)
    if len(alphabets) < n_alphabets:
        raise ValueError(f"only {len(alphabets)} scripts have enough letters, {n_alphabets} asked")
    params = _params(n_alphabets, n_characters, n_drawings, image_size, seed)
    _write_index(root, alphabets, metas, params)
    return root


def _params(
    n_alphabets: int, n_characters: int, n_drawings: int, image_size: int, seed: int
) -> dict:
    """Everything that determines a build on a given font set."""
    return {
        "version": GENERATOR_VERSION,
        "n_alphabets": n_alphabets,
        "n_characters": n_characters,
        "n_drawings": n_drawings,
        "image_size": image_size,
        "seed": seed,
        "scale": SCALE,
        "ref_size": REF_SIZE,
        "outlier_corr": OUTLIER_CORR,
        "distortion": DISTORTION,
        "skip_scripts": sorted(SKIP_SCRIPTS),
        "unicode": unicodedata.unidata_version,
        "ink": "0 on a 255 background (Omniglot)",
    }


def _write_pngs(root: Path, alphabet: _Alphabet) -> dict:
    """Write one alphabet's ROOT/<Alphabet>/characterNN/KK.png files; return its meta entry."""
    name = fontunicode.script_name(alphabet.script).replace(" ", "_")
    characters = []
    for c, (cp, fonts, picks) in enumerate(alphabet.characters):
        folder = root / name / f"character{c + 1:02d}"
        folder.mkdir(parents=True)
        for k, img in enumerate(alphabet.images[c]):
            Image.fromarray(img).save(folder / f"{k + 1:02d}.png")
        characters.append(
            {
                "folder": folder.name,
                "code_point": f"U+{cp:04X}",
                "char": chr(cp),
                "name": unicodedata.name(chr(cp), ""),
                "fonts": [Path(f).name for f in fonts],
                "drawing_fonts": picks,
            }
        )
    return {"name": name, "script": alphabet.script, "characters": characters}


def _write_index(root: Path, alphabets: list[_Alphabet], metas: list[dict], params: dict) -> None:
    """Write images.npz, then meta.json (last: its presence marks a finished build)."""
    images = np.concatenate([a.images.reshape(-1, *a.images.shape[2:]) for a in alphabets])
    sizes = [len(a.characters) for a in alphabets]
    drawings = params["n_drawings"]
    np.savez_compressed(
        root / "images.npz",
        images=images,
        alphabet=np.repeat(np.arange(len(sizes)), np.array(sizes) * drawings),
        character=np.arange(sum(sizes)).repeat(drawings),
        drawing=np.tile(np.arange(drawings), sum(sizes)),
    )
    meta = {"generator": params, "n_images": len(images), "alphabets": metas}
    (root / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))


def glyph_dataset(
    n_alphabets: int = 50,
    n_characters: int = 40,
    n_drawings: int = 20,
    image_size: int = 28,
    seed: int = 0,
    font_dirs: list[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
) -> Path:
    """A cached build for these parameters, rendered only when missing.

    The key hashes the generator parameters and the font files (paths, sizes), so a changed
    generator or font set gets a fresh build. Cache root: cache_dir, else $BILEVEL_CACHE, else
    ~/.cache/bilevel. A build goes to a temporary folder renamed into place once complete.
    """
    cache = Path(cache_dir or os.environ.get("BILEVEL_CACHE") or Path.home() / ".cache/bilevel")
    params = _params(n_alphabets, n_characters, n_drawings, image_size, seed)
    fonts = [(p, os.path.getsize(p)) for p in _font_files(font_dirs)]
    key = hashlib.sha256(json.dumps([params, fonts]).encode()).hexdigest()[:16]
    target = cache / f"glyphs-{key}"
    if (target / "meta.json").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache))
    try:
        build_glyph_dataset(
            tmp, n_alphabets, n_characters, n_drawings, image_size, seed, font_dirs, workers
        )
        tmp.rename(target)
    except OSError:
        if not (target / "meta.json").exists():  # else a concurrent build won the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

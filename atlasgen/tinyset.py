"""The tiny preset's corpus: labelled synthetic pictures drawn with PIL, deterministic from a seed.

Ten classes that differ in shape, colour, texture and object count, so that even a random-weight
2-layer ViT gives embeddings that separate them. `draw_object` and `paste_objects` are public so the
probe stage can build its own pictures (one object shrinking, many objects multiplying) from them.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .paths import atomic_dir

# Bump when the drawing changes, so cached sources are regenerated.
TINYSET_VERSION = 2
IMAGE_SIDE = 128
# Objects are drawn this many times larger and downsampled, for smooth (anti-aliased) edges.
SUPERSAMPLE = 4

OBJECT_KINDS = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 220, 40), "green": (40, 170, 60),
    "blue": (40, 80, 220), "purple": (140, 50, 190), "white": (245, 245, 245), "black": (20, 20, 20),
}

# label → how its pictures are made (see `_draw_example`).
LABELS = ("red circle", "blue square", "green triangle", "yellow star", "purple ring", "orange cross",
          "many dots", "stripes", "checkerboard", "sky and ground")


def draw_object(kind: str, colour: tuple[int, int, int] | str, size_px: int, rotation_deg: float = 0.0
                ) -> Image.Image:
    """One object of `kind` filling a transparent size_px × size_px RGBA square (anti-aliased)."""
    assert kind in OBJECT_KINDS, f"unknown object kind {kind!r}; known: {OBJECT_KINDS}"
    assert size_px >= 1, f"size_px must be ≥ 1, got {size_px}"
    rgb = COLOURS[colour] if isinstance(colour, str) else tuple(int(c) for c in colour)
    big = size_px * SUPERSAMPLE
    canvas = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    fill = (*rgb, 255)
    m = big * 0.04  # margin, so rotated corners are not clipped much
    c = big / 2
    r = c - m
    if kind == "circle":
        draw.ellipse((m, m, big - m, big - m), fill=fill)
    elif kind == "ring":
        draw.ellipse((m, m, big - m, big - m), fill=fill)
        inner = big * 0.28
        draw.ellipse((inner, inner, big - inner, big - inner), fill=(0, 0, 0, 0))
    elif kind == "square":
        s = r * 0.8
        draw.rectangle((c - s, c - s, c + s, c + s), fill=fill)
    elif kind == "cross":
        w = r * 0.32
        draw.rectangle((c - w, m, c + w, big - m), fill=fill)
        draw.rectangle((m, c - w, big - m, c + w), fill=fill)
    elif kind == "star":
        draw.polygon(_star_points(c, r, r * 0.42, 5), fill=fill)
    else:
        n_sides = {"triangle": 3, "diamond": 4, "hexagon": 6}[kind]
        draw.polygon(_regular_points(c, r, n_sides), fill=fill)
    if rotation_deg:
        canvas = canvas.rotate(rotation_deg, resample=Image.BICUBIC)
    return canvas.resize((size_px, size_px), Image.LANCZOS)


def _regular_points(c: float, r: float, n: int) -> list[tuple[float, float]]:
    return [(c + r * math.sin(2 * math.pi * i / n), c - r * math.cos(2 * math.pi * i / n)) for i in range(n)]


def _star_points(c: float, r_out: float, r_in: float, n: int) -> list[tuple[float, float]]:
    points = []
    for i in range(2 * n):
        r = r_out if i % 2 == 0 else r_in
        a = math.pi * i / n
        points.append((c + r * math.sin(a), c - r * math.cos(a)))
    return points


def paste_objects(background: Image.Image, kind: str, colour, size_px: int, count: int,
                  rng: np.random.Generator, rotate: bool = True) -> Image.Image:
    """`count` objects of one kind at random places on a copy of `background` (overlaps allowed)."""
    out = background.convert("RGB").copy()
    w, h = out.size
    for _ in range(count):
        obj = draw_object(kind, colour, size_px, float(rng.uniform(0, 360)) if rotate else 0.0)
        x = int(rng.integers(0, max(1, w - size_px + 1)))
        y = int(rng.integers(0, max(1, h - size_px + 1)))
        out.paste(obj, (x, y), obj)
    return out


def plain_background(colour: tuple[int, int, int], side: int = IMAGE_SIDE, rng: np.random.Generator | None = None,
                     noise: float = 6.0) -> Image.Image:
    """A flat background with a little pixel noise (so no two pictures are identical)."""
    arr = np.empty((side, side, 3), np.float32)
    arr[:] = colour
    if rng is not None and noise:
        arr += rng.normal(0, noise, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: float = 25) -> tuple[int, int, int]:
    return tuple(int(np.clip(v + rng.uniform(-amount, amount), 0, 255)) for v in rgb)


CLASS_BACKGROUNDS = {"red circle": (240, 228, 195), "blue square": (200, 200, 200), "green triangle": (245, 198, 210),
                     "yellow star": (35, 40, 70), "purple ring": (198, 236, 198), "orange cross": (195, 218, 246)}


def _draw_example(label: str, rng: np.random.Generator, side: int = IMAGE_SIDE) -> Image.Image:
    single = {"red circle": ("circle", "red"), "blue square": ("square", "blue"),
              "green triangle": ("triangle", "green"), "yellow star": ("star", "yellow"),
              "purple ring": ("ring", "purple"), "orange cross": ("cross", "orange")}
    if label in single:
        kind, colour = single[label]
        # Each class has its own background family: a random-weight ViT sees colour statistics far more
        # than shape, and the tiny atlas should still have class-like features to show.
        bg = _jitter(CLASS_BACKGROUNDS[label], rng, 12)
        size = int(rng.integers(side * 0.4, side * 0.8))
        return paste_objects(plain_background(bg, side, rng), kind, _jitter(COLOURS[colour], rng), size, 1, rng,
                             rotate=kind not in ("circle", "ring"))
    if label == "many dots":
        kind = str(rng.choice(["circle", "square", "diamond"]))
        colour = _jitter(COLOURS[str(rng.choice(["red", "blue", "green", "black"]))], rng)
        return paste_objects(plain_background(_jitter((246, 246, 246), rng, 8), side, rng), kind, colour,
                             int(rng.integers(side // 16, side // 9)), int(rng.integers(12, 30)), rng)
    if label == "stripes":
        a, b = rng.choice([c for c in COLOURS if c != "white"], 2, replace=False)
        period = int(rng.integers(8, 22))
        angle = float(rng.uniform(0, math.pi))
        yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) / period
        mask = (np.sin(2 * math.pi * phase) > 0)[..., None]
        arr = np.where(mask, np.array(COLOURS[a], np.float32), np.array(COLOURS[b], np.float32))
        arr += rng.normal(0, 5, arr.shape)
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if label == "checkerboard":
        # One colour against white (stripes use two colours), so the two textures differ in colour too.
        a, b = str(rng.choice([c for c in COLOURS if c not in ("white",)])), "white"
        cell = int(rng.integers(8, 24))
        yy, xx = np.mgrid[0:side, 0:side]
        off_x, off_y = rng.integers(0, cell, 2)
        mask = ((((xx + off_x) // cell) + ((yy + off_y) // cell)) % 2 == 0)[..., None]
        arr = np.where(mask, np.array(COLOURS[a], np.float32), np.array(COLOURS[b], np.float32))
        arr += rng.normal(0, 5, arr.shape)
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).rotate(
            float(rng.uniform(-20, 20)), resample=Image.BILINEAR, fillcolor=COLOURS[a])
    if label == "sky and ground":
        horizon = int(rng.integers(side * 0.45, side * 0.75))
        t = np.linspace(0, 1, horizon)[:, None, None]
        sky_top, sky_low = np.array([60, 110, 220]), np.array([190, 215, 250])
        arr = np.empty((side, side, 3), np.float32)
        arr[:horizon] = sky_top * (1 - t) + sky_low * t
        arr[horizon:] = np.array(_jitter((70, 130, 50), rng, 30))
        arr += rng.normal(0, 6, arr.shape)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        sun = draw_object("circle", (250, 230, 120), int(rng.integers(14, 28)))
        img.paste(sun, (int(rng.integers(0, side - sun.width)), int(rng.integers(2, max(3, horizon - sun.height)))),
                  sun)
        return img.filter(ImageFilter.GaussianBlur(0.6))
    raise AssertionError(f"no drawing for label {label!r}")


def example(index: int, seed: int = 0, side: int = IMAGE_SIDE) -> tuple[str, Image.Image]:
    """The `index`-th tiny picture: (label, RGB image). Labels cycle, so any n covers every class."""
    label = LABELS[index % len(LABELS)]
    rng = np.random.default_rng([seed, index])
    return label, _draw_example(label, rng, side)


def generate(out_dir: Path, n_images: int, seed: int = 0) -> Path:
    """Write `n_images` PNGs as `out_dir/<label>/<index>.png` (a class-subfolder corpus), unless the folder
    already holds exactly this set (a marker file records count, seed and drawing version)."""
    out_dir = Path(out_dir)
    marker = {"version": TINYSET_VERSION, "n_images": int(n_images), "seed": int(seed), "side": IMAGE_SIDE}
    marker_path = out_dir / ".tinyset.json"  # hidden: ingest ignores it
    if marker_path.exists() and json.loads(marker_path.read_text()) == marker:
        return out_dir
    with atomic_dir(out_dir) as tmp_dir:
        for index in range(n_images):
            label, image = example(index, seed)
            path = tmp_dir / label / f"{index:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path, "PNG")
        (tmp_dir / ".tinyset.json").write_text(json.dumps(marker))
    return out_dir

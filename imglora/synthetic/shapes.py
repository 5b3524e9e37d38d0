"""Synthetic captioned shapes: coloured shapes on plain backgrounds, deterministic from a seed.

The embedded base model is pretrained on these, the demo teaches it a new shape, and the tests use
them as a dataset that needs no download.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 205, 35),
    "purple": (140, 60, 190),
    "orange": (245, 135, 25),
}
BACKGROUNDS = {"white": (240, 240, 240), "black": (25, 25, 25), "gray": (128, 128, 128)}
# Five base shapes, two of them (cross, diamond) with concave or rotated corners, so the embedded model
# learns to draw outlines in general rather than three templates, and a LoRA can teach a new one.
BASE_SHAPES = ("circle", "square", "triangle", "cross", "diamond")
# Shapes the base model never sees; the demo and the quality benchmark teach one of them.
NEW_SHAPES = ("star", "ring", "heart")
CAPTION = "a {colour} {shape} on a {background} background"


@dataclass(frozen=True)
class Sample:
    shape: str
    colour: str
    background: str
    caption: str


def _polygon(cx: float, cy: float, r: float, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(cx + r * x, cy + r * y) for x, y in points]


def _star(n: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    pts = []
    for i in range(2 * n):
        rad = 1.0 if i % 2 == 0 else inner
        a = -math.pi / 2 + i * math.pi / n
        pts.append((rad * math.cos(a), rad * math.sin(a)))
    return pts


def _heart() -> list[tuple[float, float]]:
    pts = []
    for i in range(48):
        t = 2 * math.pi * i / 48
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x / 17, -y / 17 + 0.1))
    return pts


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, bg) -> None:
    """Draw one shape of radius `r` centred at (cx, cy)."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy + r * 0.15, r, [(0, -1), (0.95, 0.75), (-0.95, 0.75)]), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy + r * 0.08, r * 1.05, _star()), fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        h = r * 0.5
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=bg)
    elif shape == "cross":
        w = r * 0.33
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
    elif shape == "heart":
        draw.polygon(_polygon(cx, cy, r, _heart()), fill=fill)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, r, [(0, -1), (0.7, 0), (0, 1), (-0.7, 0)]), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(shape: str, colour: str, background: str, size: int, rng: random.Random) -> Image.Image:
    """One anti-aliased image (drawn at 4x, then downsampled) with jittered position, size and tint."""
    scale = 4
    big = size * scale
    bg = tuple(min(255, max(0, c + rng.randint(-8, 8))) for c in BACKGROUNDS[background])
    fill = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLOURS[colour])
    img = Image.new("RGB", (big, big), bg)
    r = big * rng.uniform(0.25, 0.36)
    margin = r * 1.05
    cx = rng.uniform(margin, big - margin)
    cy = rng.uniform(margin, big - margin)
    draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, fill, bg)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def render_with_distractor(shape: str, colour: str, background: str, size: int, rng: random.Random,
                           distractors=BASE_SHAPES) -> tuple[Image.Image, Image.Image]:
    """(image, mask): the shape in one half of the image and a smaller distractor (another shape, another
    colour, not in the caption) in the other; the mask is white on the main shape only, with a thin margin
    so that its anti-aliased edge trains too (the masked-loss benchmark's data)."""
    scale = 4
    big = size * scale
    bg = tuple(min(255, max(0, c + rng.randint(-8, 8))) for c in BACKGROUNDS[background])
    fill = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLOURS[colour])
    other = rng.choice([d for d in distractors if d != shape])
    other_fill = COLOURS[rng.choice([c for c in COLOURS if c != colour])]
    img = Image.new("RGB", (big, big), bg)
    mask = Image.new("L", (big, big), 0)
    # Side by side (left/right or top/bottom, either way round), each inside its own half: never overlapping.
    r, rd = big * rng.uniform(0.17, 0.23), big * rng.uniform(0.12, 0.17)
    vertical, main_first = rng.random() < 0.5, rng.random() < 0.5
    centres = []
    for radius, first in ((r, main_first), (rd, not main_first)):
        m = radius * 1.1
        lo = m if first else big / 2 + m
        along, across = rng.uniform(lo, lo + big / 2 - 2 * m), rng.uniform(m, big - m)
        centres.append((across, along) if vertical else (along, across))
    (cx, cy), (dx, dy) = centres
    draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, fill, bg)
    draw_shape(ImageDraw.Draw(img), other, dx, dy, rd, other_fill, bg)
    draw_shape(ImageDraw.Draw(mask), shape, cx, cy, r * 1.08, 255, 0)
    return (img.resize((size, size), Image.Resampling.LANCZOS),
            mask.resize((size, size), Image.Resampling.BOX))


def samples(n: int, seed: int, shapes=BASE_SHAPES, colours=tuple(COLOURS), backgrounds=tuple(BACKGROUNDS),
            words: dict[str, str] | None = None, caption: str = CAPTION) -> list[Sample]:
    """The labels of `n` images, cycling through every shape × colour combination (balanced)."""
    rng = random.Random(seed)
    words = words or {}
    combos = [(s, c) for s in shapes for c in colours]
    out = []
    for i in range(n):
        if i % len(combos) == 0:
            rng.shuffle(combos)
        s, c = combos[i % len(combos)]
        b = rng.choice(list(backgrounds))
        out.append(Sample(s, c, b, caption.format(colour=c, shape=words.get(s, s), background=b)))
    return out


def synth_shapes(out_dir: str | os.PathLike, n: int, seed: int = 0, size: int = 64, shapes=BASE_SHAPES,
                 colours=tuple(COLOURS), backgrounds=tuple(BACKGROUNDS), words: dict[str, str] | None = None,
                 caption: str = CAPTION, masks_dir: str | os.PathLike | None = None) -> list[tuple[Path, Sample]]:
    """Write `n` PNG images with `.txt` sidecar captions into `out_dir`; the same seed gives the same files.

    `words` renames shapes in captions (e.g. {"star": "zorbly"} for a made-up trigger word). `masks_dir`:
    every image also gets an uncaptioned distractor shape, and a mask of its main shape under the same name
    in `masks_dir` (render_with_distractor), for --masked-loss.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if masks_dir is not None:
        Path(masks_dir).mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 1)
    written = []
    for i, sample in enumerate(samples(n, seed, shapes, colours, backgrounds, words, caption)):
        path = out / f"{i:05d}.png"
        if masks_dir is None:
            render(sample.shape, sample.colour, sample.background, size, rng).save(path)
        else:
            image, mask = render_with_distractor(sample.shape, sample.colour, sample.background, size, rng)
            image.save(path)
            mask.save(Path(masks_dir) / path.name)
        path.with_suffix(".txt").write_text(sample.caption + "\n", encoding="utf-8")
        written.append((path, sample))
    return written

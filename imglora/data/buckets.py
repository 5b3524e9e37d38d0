"""Aspect-ratio buckets (kohya style): every image trains at about resolution² pixels in its own shape."""

from __future__ import annotations

import math
import random

from PIL import Image


def make_buckets(resolution: int, step: int = 64, min_side: int | None = None,
                 max_side: int | None = None) -> list[tuple[int, int]]:
    """All (w, h), multiples of `step` within [min_side, max_side], with w·h ≤ resolution², each as
    large as the area allows for its width (and the same with w and h swapped)."""
    min_side = min_side or max(step, resolution // 2 // step * step)
    max_side = max_side or resolution * 2
    area = resolution * resolution
    buckets = set()
    for w in range(min_side, max_side + 1, step):
        h = min(max_side, area // w // step * step)
        if h >= min_side:
            buckets.add((w, h))
            buckets.add((h, w))
    if not buckets:
        side = max(step, resolution // step * step)
        buckets.add((side, side))
    return sorted(buckets)


def assign_bucket(width: int, height: int, buckets, no_upscale: bool = False, step: int = 64) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log space); with no_upscale, a smaller image keeps
    its own size rounded down to `step` instead of being enlarged."""
    ratio = math.log(width / height)
    best = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))
    if no_upscale and width * height < best[0] * best[1]:
        scale = min(1.0, math.sqrt(best[0] * best[1] / (width * height)))
        w = max(step, int(width * scale) // step * step)
        h = max(step, int(height * scale) // step * step)
        return w, h
    return best


def fit_to_bucket(image: Image.Image, bucket, crop: str = "center", rng: random.Random | None = None):
    """Resize to cover the bucket, then crop to it. Returns (image, (top, left), (orig_h, orig_w))."""
    bw, bh = bucket
    w, h = image.size
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    resized = image.resize((rw, rh), Image.Resampling.LANCZOS) if (rw, rh) != (w, h) else image
    if crop == "random":
        rng = rng or random.Random()
        left, top = rng.randint(0, rw - bw), rng.randint(0, rh - bh)
    else:
        left, top = (rw - bw) // 2, (rh - bh) // 2
    return resized.crop((left, top, left + bw, top + bh)), (top, left), (h, w)

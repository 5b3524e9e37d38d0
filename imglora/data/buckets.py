"""Aspect-ratio buckets (kohya style): every image trains at about resolution² pixels in its own shape.

kohya-ss sd-scripts `model_util.make_bucket_resolutions`: the square bucket, then for every width a
multiple of `step`, the largest height (a multiple of `step`) that keeps w·h within resolution², and
the same pair transposed. Images go to the bucket with the nearest aspect ratio, are scaled to cover
it and cropped; SDXL is told the original size and the crop (its micro-conditioning).
"""

from __future__ import annotations

import math
import random

from PIL import Image

from ..errors import ImgloraError


def make_buckets(resolution: int, step: int = 64, min_side: int | None = None,
                 max_side: int | None = None) -> list[tuple[int, int]]:
    """All maximal (w, h): multiples of `step` within [min_side, max_side] with w·h ≤ resolution², sorted."""
    if step <= 0 or resolution < step:
        raise ImgloraError(f"resolution {resolution} with bucket step {step}",
                           "the resolution must be at least the step, and the step positive")
    min_side = max(step, (min_side or resolution // 2) // step * step)
    max_side = (max_side or resolution * 2) // step * step
    if min_side > max_side:
        raise ImgloraError(f"smallest bucket side {min_side} is above the largest {max_side}",
                           "lower --min-bucket or raise --max-bucket")
    area = resolution * resolution
    square = min(max_side, max(min_side, math.isqrt(area) // step * step))
    buckets = {(square, square)}
    for w in range(min_side, max_side + 1, step):
        h = min(max_side, area // w // step * step)
        if h >= min_side:
            buckets.add((w, h))
            buckets.add((h, w))
    return sorted(buckets)


def assign_bucket(width: int, height: int, buckets, no_upscale: bool = False, step: int = 64) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log space, ties to the larger bucket).

    With no_upscale, an image with fewer pixels than that bucket is not enlarged: it gets its own
    bucket, its size rounded down to `step` (kohya's `bucket_no_upscale`)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height}")
    ratio = math.log(width / height)
    best = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))
    if no_upscale and width * height < best[0] * best[1]:
        return max(step, width // step * step), max(step, height // step * step)
    return tuple(best)


def scaled_size(size, bucket) -> tuple[int, int]:
    """The (width, height) an image of `size` is scaled to before it is cropped to `bucket` (a mask follows it)."""
    (w, h), (bw, bh) = size, bucket
    scale = max(bw / w, bh / h)
    # Round, but never below the bucket: a 1-pixel shortfall would make the crop fail.
    return max(bw, round(w * scale)), max(bh, round(h * scale))


def fit_to_bucket(image: Image.Image, bucket, crop: str = "center", rng: random.Random | None = None):
    """Scale to cover the bucket, then crop to it.

    Returns (image of exactly the bucket size, crop (top, left) in the scaled image, original (h, w)):
    SDXL's `crops_coords_top_left` and `original_size`."""
    if crop not in ("center", "random"):
        raise ValueError(f"crop must be 'center' or 'random', not {crop!r}")
    bw, bh = bucket
    w, h = image.size
    scale = max(bw / w, bh / h)
    rw, rh = scaled_size((w, h), bucket)
    if (rw, rh) != (w, h):
        # reducing_gap: a box pre-shrink for big reductions (many times faster, indistinguishable).
        image = image.resize((rw, rh), Image.Resampling.LANCZOS, reducing_gap=3.0 if scale < 1 else None)
    if crop == "random":
        rng = rng or random.Random()
        left, top = rng.randint(0, rw - bw), rng.randint(0, rh - bh)
    else:
        left, top = (rw - bw) // 2, (rh - bh) // 2
    if (rw, rh) != (bw, bh):
        image = image.crop((left, top, left + bw, top + bh))
    return image, (top, left), (h, w)


def bucketer(resolution: int, step: int = 64, min_side: int | None = None, max_side: int | None = None,
             no_upscale: bool = False):
    """The trainer's bucket rule as one function, (width, height) -> bucket, for everything that must agree
    with it (the trainer, `imglora-data stats` and `check`)."""
    buckets = make_buckets(resolution, step, min_side, max_side)
    return lambda width, height: assign_bucket(width, height, buckets, no_upscale=no_upscale, step=step)

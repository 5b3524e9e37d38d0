"""Aspect-ratio buckets: the kohya rule, where mixed sizes land, no_upscale, and the SDXL crop numbers."""

import random

import pytest
from PIL import Image

from imglora.data.buckets import assign_bucket, fit_to_bucket, make_buckets
from imglora.data.images import probe_image
from imglora.errors import ImgloraError


@pytest.mark.parametrize("resolution,step", [(512, 64), (1024, 64), (768, 32), (32, 16), (100, 64)])
def test_buckets_follow_the_kohya_rule(resolution, step):
    buckets = make_buckets(resolution, step)
    area = resolution * resolution
    lo, hi = max(step, resolution // 2 // step * step), resolution * 2
    assert buckets == sorted(set(buckets))
    for w, h in buckets:
        assert w % step == 0 and h % step == 0 and w * h <= area
        assert lo <= w <= hi and lo <= h <= hi
        assert (h, w) in buckets  # every shape in both orientations
    square = max(step, int(area**0.5) // step * step)
    assert (square, square) in buckets
    # maximal: a bucket's short side cannot grow by a step and still fit (kohya takes, for every long
    # side, the largest short side that fits; the transposes come along)
    for w, h in buckets:
        if w != h:
            grow = (w + step, h) if w < h else (w, h + step)
            assert grow[0] * grow[1] > area or max(grow) > hi


def test_bucket_lists():
    assert make_buckets(64) == [(64, 64)]
    b512 = make_buckets(512)
    assert {(512, 512), (256, 1024), (1024, 256), (640, 384), (384, 640), (448, 576)} <= set(b512)
    assert max(w for w, _ in b512) == 1024 and min(w for w, _ in b512) == 256
    assert make_buckets(1024, 64, min_side=768, max_side=1280) == [
        (768, 1280), (832, 1216), (896, 1152), (960, 1088), (1024, 1024), (1088, 960), (1152, 896), (1216, 832),
        (1280, 768)]
    with pytest.raises(ImgloraError):
        make_buckets(32, 64)
    with pytest.raises(ImgloraError):
        make_buckets(512, 64, min_side=1024, max_side=512)


# (width, height) -> the bucket at 512 px, step 64: the nearest aspect ratio, never a stretched one
MIXED = {
    (1920, 1080): (640, 384),  # 16:9 -> 5:3
    (1080, 1920): (384, 640),
    (1000, 1000): (512, 512),
    (300, 300): (512, 512),  # small images are upscaled unless no_upscale
    (4000, 3000): (576, 448),  # 4:3 -> 9:7
    (3000, 4000): (448, 576),
    (6000, 1000): (1024, 256),  # 6:1 -> the most extreme bucket, 4:1
    (800, 1200): (384, 640),  # 2:3 -> 3:5 (log distance 0.105 against 0.154 for 448x576)
    (512, 768): (384, 640),
    (2048, 1024): (704, 320),  # 2:1 -> 2.2:1
}


@pytest.mark.parametrize("size", sorted(MIXED))
def test_mixed_sizes_land_in_the_specified_buckets(size):
    assert assign_bucket(*size, make_buckets(512)) == MIXED[size]


def test_no_upscale_gives_small_images_their_own_bucket():
    buckets = make_buckets(512)
    assert assign_bucket(300, 300, buckets, no_upscale=True) == (256, 256)
    assert assign_bucket(200, 130, buckets, no_upscale=True) == (192, 128)  # rounded down, aspect roughly kept
    assert assign_bucket(40, 40, buckets, no_upscale=True) == (64, 64)  # never below one step
    assert assign_bucket(1920, 1080, buckets, no_upscale=True) == (640, 384)  # big images as before
    assert assign_bucket(500, 500, buckets, no_upscale=True, step=32) == (480, 480)


def test_bucketing_uses_the_size_after_exif_rotation(tmp_path):
    """RELIABILITY.md I4: a 64x32 photo tagged orientation 6 is 32x64 on screen and trains as portrait."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (1024, 512)).save(tmp_path / "r.jpg", exif=exif)
    w, h = probe_image(tmp_path / "r.jpg").size
    assert assign_bucket(w, h, make_buckets(512)) == (320, 704)


def test_fit_to_bucket_covers_then_crops():
    img, crop, original = fit_to_bucket(Image.new("RGB", (1920, 1080)), (640, 384))
    assert img.size == (640, 384) and original == (1080, 1920)
    assert crop == (0, (683 - 640) // 2)  # scaled to 683x384, centre-cropped in width
    img, crop, original = fit_to_bucket(Image.new("RGB", (100, 300)), (64, 64), crop="random", rng=random.Random(1))
    assert img.size == (64, 64) and crop[1] == 0 and 0 <= crop[0] <= 128 and original == (300, 100)
    same = Image.new("RGB", (64, 64), "red")
    img, crop, _ = fit_to_bucket(same, (64, 64))
    assert img.size == (64, 64) and crop == (0, 0)
    img, _, _ = fit_to_bucket(Image.new("RGB", (30, 20)), (64, 64))  # upscaling also covers
    assert img.size == (64, 64)
    with pytest.raises(ValueError):
        fit_to_bucket(same, (64, 64), crop="left")


def test_random_crops_are_deterministic_per_seed_and_cover_the_range():
    img = Image.new("RGB", (300, 100))
    crops = [fit_to_bucket(img, (64, 64), "random", random.Random(s))[1] for s in range(50)]
    assert crops == [fit_to_bucket(img, (64, 64), "random", random.Random(s))[1] for s in range(50)]
    lefts = [left for _, left in crops]
    assert min(lefts) < 20 and max(lefts) > 105 and all(0 <= x <= 128 for x in lefts)

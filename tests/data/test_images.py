"""Opening training images: RELIABILITY.md I1-I7, and bucketing."""

import io
import random
import time

import numpy as np
import pytest
from PIL import Image

from imglora.data.buckets import assign_bucket, fit_to_bucket, make_buckets
from imglora.data.images import load_image, probe_image
from imglora.errors import ImgloraError


def test_decompression_bomb_is_refused_fast(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (14000, 14000)).save(bomb)
    assert bomb.stat().st_size < 100_000
    t = time.perf_counter()
    for fn in (probe_image, load_image):
        with pytest.raises(ImgloraError, match="decompression bomb"):
            fn(bomb)
    assert time.perf_counter() - t < 1.0


def test_truncated_jpeg_is_caught_although_verify_passes(tmp_path):
    buf = io.BytesIO()
    Image.effect_noise((256, 256), 40).convert("RGB").save(buf, "JPEG")
    half = tmp_path / "half.jpg"
    half.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with Image.open(half) as img:
        img.verify()  # passes: this is why a full decode is needed
    with pytest.raises(ImgloraError, match="truncated"):
        load_image(half)


@pytest.mark.parametrize("name,data", [("zero.jpg", b""), ("text.jpg", b"hello, not an image"),
                                       ("page.jpg", b"<html><body>404</body></html>")])
def test_not_images(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ImgloraError, match="empty file|not a supported image"):
        load_image(tmp_path / name)


def test_other_formats_renamed_are_refused(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png", format="TIFF")
    with pytest.raises(ImgloraError, match="not a supported image"):
        load_image(tmp_path / "x.png")
    (tmp_path / "y.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    with pytest.raises(ImgloraError, match="not a supported image"):
        load_image(tmp_path / "y.png")


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (64, 32), "red")
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert probe_image(tmp_path / "rot.jpg").size == (32, 64)
    assert load_image(tmp_path / "rot.jpg").size == (32, 64)


def test_16_bit_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(4096, dtype=np.uint16).reshape(64, 64) * 16)
    Image.fromarray(ramp, "I;16").save(tmp_path / "ramp.png")
    levels = np.unique(np.asarray(load_image(tmp_path / "ramp.png"))[..., 0])
    assert len(levels) >= 200


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_take_the_background(tmp_path, mode):
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    img.putpixel((0, 0), (0, 255, 0, 0))  # hidden green under alpha 0
    if mode == "LA":
        img = img.convert("LA")
    elif mode == "P":
        img = img.convert("P")
        img.info["transparency"] = img.getpixel((0, 0))
    img.save(tmp_path / "a.png", transparency=img.info.get("transparency")) if mode == "P" else \
        img.save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png", background=(10, 20, 30))
    assert out.getpixel((0, 0)) == (10, 20, 30)


def test_cmyk_and_animation(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    r, g, b = load_image(tmp_path / "c.jpg").getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue", "green")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert probe_image(tmp_path / "anim.gif").n_frames == 3
    assert load_image(tmp_path / "anim.gif").getpixel((1, 1))[0] > 200  # frame 0 is red


def test_buckets_follow_the_kohya_rule():
    buckets = make_buckets(512, 64)
    assert (512, 512) in buckets and all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert (256, 1024) in buckets and (1024, 256) in buckets
    assert make_buckets(64) == [(64, 64)]
    assert assign_bucket(1920, 1080, buckets) == (640, 384)
    assert assign_bucket(1000, 1000, buckets) == (512, 512)
    assert assign_bucket(300, 300, buckets, no_upscale=True) == (256, 256)
    img, crop, original = fit_to_bucket(Image.new("RGB", (1920, 1080)), (640, 384))
    assert img.size == (640, 384) and original == (1080, 1920) and crop[0] == 0
    img, crop, _ = fit_to_bucket(Image.new("RGB", (100, 300)), (64, 64), crop="random", rng=random.Random(1))
    assert img.size == (64, 64) and crop[1] == 0 and 0 <= crop[0] <= 128

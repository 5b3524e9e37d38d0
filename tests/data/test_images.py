"""Opening training images: RELIABILITY.md I1-I7 through probe_image/load_image, and what check/scan see."""

import io
import os
import random
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from imglora.data.images import IMAGE_EXTENSIONS, load_image, probe_image, sniff
from imglora.data.scan import inspect_image
from imglora.errors import ImgloraError


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(w: int, h: int) -> bytes:
    """A PNG that claims w x h 1-bit pixels with an empty IDAT: the header is all open() reads."""
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b"")


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def test_i1_decompression_bomb_is_refused_fast_and_small(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (14000, 14000)).save(bomb)  # 196 MP in ~24 KB
    assert bomb.stat().st_size < 30_000
    before = rss_mb()
    t = time.perf_counter()
    for fn in (probe_image, load_image, inspect_image):
        with pytest.raises(ImgloraError, match=r"decompression bomb \(196 MP\)"):
            fn(bomb)
    assert time.perf_counter() - t < 0.5
    assert rss_mb() - before < 100


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # pytest records it; we still refuse
@pytest.mark.parametrize("w,h,mp", [(10000, 10000, 100), (9500, 9500, 90), (13000, 13700, 178)])
def test_i1_images_between_one_and_two_times_the_limit_are_flagged_too(tmp_path, w, h, mp):
    path = tmp_path / "big.png"
    path.write_bytes(png_header_only(w, h))  # Pillow only warns at this size; we refuse
    for fn in (probe_image, load_image):
        with pytest.raises(ImgloraError, match=rf"decompression bomb \({mp} MP\)"):
            fn(path)


def test_i2_truncated_jpeg_is_caught_although_verify_passes(tmp_path):
    for progressive in (False, True):
        data = encoded(Image.effect_noise((256, 256), 40).convert("RGB"), "JPEG", progressive=progressive)
        for cut in (len(data) // 2, len(data) - 2):  # half, and only the end-of-image marker missing
            half = tmp_path / "half.jpg"
            half.write_bytes(data[:cut])
            with Image.open(half) as img:
                img.verify()  # passes: this is why a decode is needed
            assert probe_image(half).size == (256, 256)  # the header alone looks fine
            for fn in (load_image, inspect_image):  # the trainer's scan decodes at 1/8 scale, still caught
                with pytest.raises(ImgloraError, match="truncated"):
                    fn(half)


def test_truncated_png_is_caught_by_the_scan_and_the_loader(tmp_path):
    data = encoded(Image.effect_noise((128, 128), 40).convert("RGB"), "PNG")
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    for fn in (load_image, inspect_image):
        with pytest.raises(ImgloraError, match="truncated"):
            fn(tmp_path / "cut.png")


def _tiff(path):
    Image.new("RGB", (8, 8)).save(path, format="TIFF")


NOT_IMAGES = {
    "zero.jpg": (b"", "empty file"),
    "text.jpg": (b"hello, not an image", "text"),
    "page.jpg": (b"<!DOCTYPE html><html><body>404</body></html>", "HTML page"),
    "eps.png": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "EPS data"),
    "psd.png": (b"8BPS\x00\x01" + bytes(40), "PSD data"),
    "fits.png": (b"SIMPLE  =                    T" + b" " * 50, "FITS data"),
    "phone.jpg": (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "HEIC"),
    "lfs.png": (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 12\n", "Git LFS pointer"),
}


@pytest.mark.parametrize("name", sorted(NOT_IMAGES))
def test_i3_non_images_are_not_a_supported_image(tmp_path, name):
    data, kind = NOT_IMAGES[name]
    (tmp_path / name).write_bytes(data)
    for fn in (probe_image, load_image, inspect_image):
        with pytest.raises(ImgloraError, match="not a supported image") as e:
            fn(tmp_path / name)
        assert kind in e.value.what and e.value.path == str(tmp_path / name)


def test_i3_tiff_named_png_is_refused_and_eps_never_reaches_ghostscript(tmp_path, monkeypatch):
    _tiff(tmp_path / "x.png")
    with pytest.raises(ImgloraError, match=r"not a supported image \(TIFF data in a .png file\)"):
        load_image(tmp_path / "x.png")
    from PIL import EpsImagePlugin

    def never(*a, **k):
        raise AssertionError("Ghostscript was reached")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", never)
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", never)
    (tmp_path / "y.png").write_bytes(NOT_IMAGES["eps.png"][0])
    with pytest.raises(ImgloraError, match="EPS data"):
        load_image(tmp_path / "y.png")


def test_unknown_extensions_fifos_and_broken_links_are_one_line_errors(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.tif", format="TIFF")
    with pytest.raises(ImgloraError, match=r"not a supported image type \(.tif\)"):
        load_image(tmp_path / "x.tif")
    os.mkfifo(tmp_path / "pipe.png")  # opening it would block forever
    with pytest.raises(ImgloraError, match="not a regular file"):
        probe_image(tmp_path / "pipe.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "dead.png")
    with pytest.raises(ImgloraError, match="broken symlink"):
        load_image(tmp_path / "dead.png")
    assert {".png", ".jpg", ".jpeg", ".webp", ".bmp"} <= IMAGE_EXTENSIONS


def test_a_supported_format_under_another_extension_opens_as_what_it_is(tmp_path):
    Image.new("RGB", (16, 8), "blue").save(tmp_path / "p.jpg", format="PNG")  # a browser "Save as" classic
    info = probe_image(tmp_path / "p.jpg")
    assert info.format == "PNG" and info.size == (16, 8)
    assert load_image(tmp_path / "p.jpg").getpixel((0, 0)) == (0, 0, 255)


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def test_i4_exif_rotation_is_applied_in_probe_and_load(tmp_path):
    img = Image.new("RGB", (64, 32), "red")
    img.paste((0, 0, 255), (0, 0, 8, 8))  # a blue corner, top-left before rotation
    img.save(tmp_path / "rot.jpg", exif=_exif(6))
    info = probe_image(tmp_path / "rot.jpg")
    assert info.size == (32, 64) and info.exif_transposed
    out = load_image(tmp_path / "rot.jpg")
    assert out.size == (32, 64)
    assert out.getpixel((28, 3))[2] > 200  # orientation 6: rotated 90° clockwise, the corner is now top-right
    img.save(tmp_path / "plain.jpg", exif=_exif(1))
    assert not probe_image(tmp_path / "plain.jpg").exif_transposed


def test_i4_png_exif_after_the_pixels_is_found_without_a_full_decode(tmp_path):
    data = encoded(Image.new("RGB", (64, 32), "red"), "PNG")
    end = data.rindex(b"IEND") - 4
    (tmp_path / "late.png").write_bytes(data[:end] + _chunk(b"eXIf", _exif(8).tobytes()) + data[end:])
    assert probe_image(tmp_path / "late.png").size == (32, 64)
    assert load_image(tmp_path / "late.png").size == (32, 64)
    Image.new("RGB", (64, 32)).save(tmp_path / "early.png", exif=_exif(5))
    assert probe_image(tmp_path / "early.png").size == (32, 64)


def test_probe_reads_only_the_header(tmp_path):
    Image.effect_noise((1200, 1200), 40).convert("L").save(tmp_path / "big.png", compress_level=1)

    def best(fn):
        times = []
        for _ in range(5):
            t = time.perf_counter()
            fn(tmp_path / "big.png")
            times.append(time.perf_counter() - t)
        return min(times)

    assert best(probe_image) < best(load_image) / 5  # PngImageFile.getexif() alone would decode it all


def test_i5_16_bit_is_scaled_not_clipped(tmp_path):
    ramp = np.arange(4096, dtype=np.uint16).reshape(64, 64) * 16
    Image.fromarray(ramp, "I;16").save(tmp_path / "ramp.png")
    assert probe_image(tmp_path / "ramp.png").mode.startswith("I;16")
    out = np.asarray(load_image(tmp_path / "ramp.png"))
    assert len(np.unique(out[..., 0])) >= 200
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255  # full range, not 17 clipped levels


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "RGB-tRNS", "GIF"])
def test_i6_transparent_pixels_take_the_background(tmp_path, mode):
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    img.putpixel((0, 0), (0, 255, 0, 0))  # hidden green under alpha 0
    path = tmp_path / ("a.gif" if mode == "GIF" else "a.png")
    if mode == "LA":
        img.convert("LA").save(path)
    elif mode in ("P", "GIF"):
        p = img.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
        p.save(path, transparency=p.getpixel((0, 0)))
    elif mode == "RGB-tRNS":
        img.convert("RGB").save(path, transparency=(0, 255, 0))  # a transparent colour, no alpha channel
    else:
        img.save(path)
    out = load_image(path, background=(10, 20, 30))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (10, 20, 30)
    assert out.getpixel((4, 4))[0] > 200 or mode == "LA"  # opaque pixels keep their colour


def test_i7_cmyk_converts_correctly(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    assert probe_image(tmp_path / "c.jpg").mode == "CMYK"
    r, g, b = load_image(tmp_path / "c.jpg").getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_i7_animation_opens_at_frame_0_and_says_how_many_frames(tmp_path, fmt):
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue", "green")]
    path = tmp_path / f"anim.{fmt.lower()}"
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=100, lossless=True)
    assert probe_image(path).n_frames == 3
    r, g, b = load_image(path).getpixel((8, 8))
    assert r > 200 and b < 60  # frame 0 is red


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "I;16", "LA", "RGBA"])
def test_every_mode_loads_as_8_bit_rgb(tmp_path, mode):
    src = Image.effect_noise((32, 32), 60).convert("RGB")
    img = Image.fromarray(np.asarray(src.convert("L"), dtype=np.uint16) * 257, "I;16") if mode == "I;16" else \
        src.convert(mode)
    img.save(tmp_path / "m.png")
    out = load_image(tmp_path / "m.png")
    assert out.mode == "RGB" and out.size == (32, 32)


def test_sniff_names_what_a_file_is():
    assert sniff(b"\x89PNG\r\n\x1a\n") == "PNG" and sniff(b"II*\x00") == "TIFF"
    assert sniff(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "WEBP" and sniff(b"\x00\x00\x00\x1cftypavif") == "AVIF"
    assert sniff(b"\x00\x01\x02\xff") is None


def test_images_load_from_bytes_too():
    data = encoded(Image.new("RGB", (8, 4), "red"), "PNG")
    assert load_image("mem.png", data=data).size == (8, 4) and probe_image("mem.png", data=data).format == "PNG"
    with pytest.raises(ImgloraError, match="mem.png: not a supported image"):
        load_image("mem.png", data=b"nope")


def test_z1_mutated_images_raise_only_imglora_error(tmp_path):
    """A small replay of RELIABILITY.md Z1: flipped and cut bytes never escape as another exception type."""
    rng = random.Random(0)
    seeds = {"png": encoded(Image.effect_noise((24, 24), 50).convert("RGBA"), "PNG"),
             "jpg": encoded(Image.effect_noise((24, 24), 50).convert("RGB"), "JPEG"),
             "gif": encoded(Image.effect_noise((24, 24), 50).convert("P"), "GIF"),
             "webp": encoded(Image.effect_noise((24, 24), 50).convert("RGB"), "WEBP"),
             "bmp": encoded(Image.effect_noise((24, 24), 50).convert("RGB"), "BMP")}
    outcomes = {"ok": 0, "error": 0}
    for i in range(300):
        ext, data = rng.choice(sorted(seeds.items()))
        data = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data))]
        path = tmp_path / f"m{i}.{ext}"
        path.write_bytes(bytes(data))
        for fn in (probe_image, load_image, inspect_image):
            try:
                fn(path)
                outcomes["ok"] += 1
            except ImgloraError as e:
                assert e.path == str(path) and e.fix
                outcomes["error"] += 1
    assert outcomes["ok"] and outcomes["error"]

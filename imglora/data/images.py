"""Opening training images safely: known formats only, decompression bombs, truncation, EXIF and modes.

RELIABILITY.md §2: Pillow sniffs formats by content, only warns below 2x its pixel limit, passes
`verify()` on a half JPEG and clips 16-bit images; every one of those is handled here, and every
failure is an ImgloraError naming the file (I1-I7).
"""

from __future__ import annotations

import io
import os
import re
import stat
import struct
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import ImgloraError

# The decoders imglora ever runs. An image opens only if its bytes are one of these, whatever its
# extension says, so a TIFF, PSD or EPS renamed .png is refused and Ghostscript is never reached
# (Pillow security.rst S-1, E-2). A multi-picture JPEG (MPO, from cameras) opens as JPEG.
SAFE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
EXTENSION_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".jfif": "JPEG",
                     ".webp": "WEBP", ".gif": "GIF", ".bmp": "BMP"}
IMAGE_EXTENSIONS = frozenset(EXTENSION_FORMATS)
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's MAX_IMAGE_PIXELS (Image.py:86); its *warning* level is our limit
ORIENTATION = 0x0112
BOMB_FIX = "remove it or shrink it below 89 MP; no training image needs that many pixels"

# RELIABILITY.md §2 (D-1): the warning between 1x and 2x the limit is an error too. The explicit size
# checks below do the real work (a warnings filter is process-wide and test runners replace it).
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


@dataclass
class ImageInfo:
    path: Path
    format: str  # what the bytes are (PNG, JPEG, MPO, WEBP, GIF, BMP), not what the extension says
    mode: str
    size: tuple[int, int]  # (width, height) after EXIF rotation: what trains
    exif_transposed: bool
    n_frames: int
    alpha: bool = False  # has_alpha: an alpha channel or a transparent colour (--alpha-mask reads it as a mask)


def max_pixels() -> int:
    """The pixel limit: Pillow's default, or a stricter one a caller set (never None or higher here)."""
    return min(Image.MAX_IMAGE_PIXELS or DEFAULT_MAX_PIXELS, DEFAULT_MAX_PIXELS)


def _bomb(path, pixels: int) -> ImgloraError:
    return ImgloraError(f"decompression bomb ({pixels / 1e6:.0f} MP)", BOMB_FIX, path=path)


# Magic bytes of what commonly ends up in image folders, to say what a refused file really is.
_MAGIC = [(b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
          (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"%!PS", "EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"),
          (b"8BPS", "PSD"), (b"SIMPLE  =", "FITS"), (b"%PDF", "PDF"), (b"PK\x03\x04", "ZIP"),
          (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\x00\x00\x01\x00", "ICO"), (b"qoif", "QOI")]


def sniff(head: bytes) -> str | None:
    """What the first bytes of a file say it is (None when unknown)."""
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp":
        return "AVIF" if head[8:12] in (b"avif", b"avis") else "HEIC"
    if head.startswith(b"version https://git-lfs"):
        return "Git LFS pointer"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "HTML page"
    if text.startswith((b"<?xml", b"<svg")):
        return "SVG" if b"<svg" in text else "XML"
    if head and all(32 <= b < 127 or b in b"\t\r\n" for b in head[:256]):
        return "text"
    return None


def _not_an_image(path: Path, head: bytes) -> ImgloraError:
    suffix = path.suffix.lower() or "no extension"
    real = sniff(head)
    if not head:
        return ImgloraError("not a supported image (empty file, 0 bytes)", "remove it or copy it again", path=path)
    if real in SAFE_FORMATS:
        return ImgloraError(f"not a supported image (corrupt {real} header)", "remove it or copy it again", path=path)
    if real in ("HEIC", "AVIF"):
        return ImgloraError(f"not a supported image ({real} in a {suffix} file)", "convert it to JPEG or PNG",
                            path=path)
    if real == "Git LFS pointer":
        return ImgloraError("not a supported image (a Git LFS pointer)", "run `git lfs pull` in its repository",
                            path=path)
    if real in ("HTML page", "text", "XML"):
        return ImgloraError(f"not a supported image ({real} in a {suffix} file; a failed download?)",
                            "download it again or remove it", path=path)
    kind = f"{real} data" if real else "unknown data"
    return ImgloraError(f"not a supported image ({kind} in a {suffix} file)",
                        "re-save it as PNG or JPEG, or remove it", path=path)


def _check_size(img: Image.Image, path: Path) -> None:
    w, h = img.size
    if w * h > max_pixels():
        raise _bomb(path, w * h)


def open_image(path, fp) -> Image.Image:
    """Image.open restricted to SAFE_FORMATS, with bombs and non-images as ImgloraError; nothing decoded.

    `fp` is an open binary file (or BytesIO) of the path; the caller owns it and closes it."""
    path = Path(path)
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise ImgloraError(f"not a supported image type ({path.suffix or 'no extension'})",
                           f"use one of {', '.join(sorted(IMAGE_EXTENSIONS))}", path=path)
    try:
        img = Image.open(fp, formats=SAFE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        raise _bomb(path, int(m[1]) if m else max_pixels() + 1) from None
    except Exception:  # UnidentifiedImageError, or a parser error on a malformed header
        fp.seek(0)
        raise _not_an_image(path, fp.read(512)) from None
    _check_size(img, path)
    return img


@contextmanager
def opened(path, data: bytes | None = None):
    """`with opened(path) as img:` the header-read image (from `data` if given), file closed after."""
    path = Path(path)
    if data is not None:
        fp = io.BytesIO(data)
    else:
        fp = open_file(path)
    with fp:
        # Not `with img`: closing an image frees its pixels, and a decoded image stays usable without the file.
        yield open_image(path, fp)


def open_file(path: Path):
    """The file opened for reading, refusing what is not a regular file (a FIFO would block forever)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ImgloraError("not a regular file", "remove it; put only image files in the folder", path=path)
        return open(path, "rb")
    except OSError as e:
        if os.path.islink(path) and not os.path.exists(path):
            raise ImgloraError("broken symlink", "remove the link or restore its target", path=path) from None
        raise ImgloraError(f"unreadable ({e.strerror})", "check the file and its permissions", path=path) from None


def _png_late_metadata(fp) -> bool:
    """True if a PNG has EXIF or XMP *after* its pixel data, which Pillow reads only on a full decode.

    Walks the chunk headers (a few seeks), so probing stays a header read for the common layout."""
    pos = fp.tell()
    try:
        fp.seek(8)
        seen_idat = False
        while True:
            head = fp.read(8)
            if len(head) < 8:
                return False
            length, kind = struct.unpack(">I4s", head)
            if kind == b"IEND":
                return False
            if kind == b"IDAT":
                seen_idat = True
            elif seen_idat and kind == b"eXIf":
                return True
            elif seen_idat and kind in (b"tEXt", b"zTXt", b"iTXt"):
                key = fp.read(min(length, 80)).split(b"\0", 1)[0]
                if key in (b"Raw profile type exif", b"XML:com.adobe.xmp"):
                    return True
                length -= min(length, 80)
            fp.seek(length + 4, 1)  # data (rest) + CRC
    finally:
        fp.seek(pos)


def orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8) that ImageOps.exif_transpose will apply, without decoding pixels."""
    if img.format == "PNG" and getattr(img, "fp", None) is not None and not _png_late_metadata(img.fp):
        # PngImageFile.getexif() decodes the whole image; the base method reads only what the header gave,
        # which is all there is unless EXIF/XMP chunks follow the pixel data.
        exif = Image.Image.getexif(img)
    else:
        exif = img.getexif()
    value = exif.get(ORIENTATION, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def info_of(img: Image.Image, path) -> ImageInfo:
    """ImageInfo of an opened (not yet decoded) image."""
    w, h = img.size
    turn = orientation(img)
    size = (h, w) if turn in (5, 6, 7, 8) else (w, h)
    return ImageInfo(Path(path), img.format, img.mode, size, turn != 1, getattr(img, "n_frames", 1), has_alpha(img))


def probe_image(path, data: bytes | None = None) -> ImageInfo:
    """Header only: format, mode, size after EXIF rotation, frames. Fast; truncation is not seen."""
    with opened(path, data) as img:
        try:
            return info_of(img, path)
        except ImgloraError:
            raise
        except Exception as e:  # a corrupt EXIF block or chunk table
            raise decode_error(path, e) from None


def decode_error(path, e: Exception) -> ImgloraError:
    text = str(e)
    if isinstance(e, MemoryError):
        return ImgloraError("too large to decode (out of memory)", BOMB_FIX, path=path)
    if "truncat" in text.lower() or isinstance(e, EOFError):
        return ImgloraError("truncated image (the file is cut short)", "copy or download it again", path=path)
    short = text.splitlines()[0][:100] if text else type(e).__name__
    return ImgloraError(f"corrupt image ({short})", "re-save it with an image editor, or remove it", path=path)


def to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit grey scaled to 0-255; Pillow's own convert clips (4096 levels become 17, Pillow#2574)."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        top = 65535.0
    elif img.mode == "F":
        top = max(1.0, float(arr.max())) if arr.size else 1.0
    else:  # "I": 32-bit integers, in practice 16-bit data
        top = 65535.0 if not arr.size or arr.max() <= 65535 else float(arr.max())
    return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")


def has_alpha(img: Image.Image) -> bool:
    """Whether the mode or a tRNS/GIF transparency entry can make pixels see-through."""
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def to_rgb(img: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """Any decoded mode as 8-bit RGB, transparency flattened onto `background` (never the hidden colour)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = to_8bit(img)
    if has_alpha(img):
        rgba = img.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, tuple(background)[:3] + (255,))
        flat.alpha_composite(rgba)
        return flat.convert("RGB")
    return img.convert("RGB")  # CMYK, YCbCr, 1, L, P: Pillow's conversions are correct for these


def load_image(path, background=(255, 255, 255), data: bytes | None = None) -> Image.Image:
    """The image as 8-bit RGB: EXIF orientation applied, transparency flattened onto `background`,
    CMYK and 16-bit converted correctly, animations at their first frame. Truncated files are errors.

    `data`: the file's bytes, if already read (or to fuzz it without a file); `path` then only names it."""
    path = Path(path)
    with opened(path, data) as img:
        try:
            img.load()  # full decode: a truncated JPEG passes verify() and fails only here (I2)
            return to_rgb(ImageOps.exif_transpose(img), background)
        except ImgloraError:
            raise
        except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, EOFError, struct.error...
            raise decode_error(path, e) from None

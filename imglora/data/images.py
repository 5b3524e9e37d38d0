"""Opening training images safely: format by extension, decompression bombs, truncation, EXIF and modes.

RELIABILITY.md §2: Pillow sniffs formats by content, only warns below 2× its pixel limit, passes
`verify()` on a half JPEG and clips 16-bit images; every one of those is handled here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import ImgloraError

# Extension -> the Pillow formats allowed for it (a TIFF or EPS renamed .png is refused, never decoded).
FORMATS = {".png": ["PNG"], ".jpg": ["JPEG"], ".jpeg": ["JPEG"], ".webp": ["WEBP"], ".bmp": ["BMP"],
           ".gif": ["GIF"]}
IMAGE_EXTENSIONS = frozenset(FORMATS)
MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # 89.5 MP: Pillow's own warning threshold, treated as an error


@dataclass
class ImageInfo:
    path: Path
    format: str
    mode: str
    size: tuple[int, int]  # (width, height) after EXIF rotation
    exif_transposed: bool
    n_frames: int


def _open(path: Path) -> Image.Image:
    formats = FORMATS.get(path.suffix.lower())
    if formats is None:
        raise ImgloraError(f"not a supported image type ({path.suffix or 'no extension'})",
                           f"use one of {', '.join(sorted(IMAGE_EXTENSIONS))}", path=path)
    try:
        if path.stat().st_size == 0:
            raise ImgloraError("empty file (0 bytes)", "remove it or copy it again", path=path)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path, formats=formats)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImgloraError("decompression bomb (over 89 MP)", "remove it; no training image needs that many pixels",
                           path=path) from None
    except ImgloraError:
        raise
    except OSError as e:
        if isinstance(e, (PermissionError, FileNotFoundError, IsADirectoryError)):
            raise ImgloraError(f"unreadable ({e.strerror})", "check the file and its permissions", path=path) from None
        raise ImgloraError(f"not a supported image (not a valid {formats[0]} file)",
                           "remove it or re-save it as PNG or JPEG", path=path) from None


def _rotated_size(img: Image.Image) -> tuple[tuple[int, int], bool]:
    orientation = img.getexif().get(0x0112, 1)
    w, h = img.size
    return ((h, w) if orientation in (5, 6, 7, 8) else (w, h)), orientation not in (1, None)


def probe_image(path) -> ImageInfo:
    """Header only: format, mode, size after EXIF rotation, frames. Fast; full decode problems are not seen."""
    path = Path(path)
    with _open(path) as img:
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise ImgloraError(f"decompression bomb ({w * h / 1e6:.0f} MP)",
                               "remove it; no training image needs that many pixels", path=path)
        size, rotated = _rotated_size(img)
        return ImageInfo(path, img.format, img.mode, size, rotated, getattr(img, "n_frames", 1))


def _to_8bit(img: Image.Image) -> Image.Image:
    """16- and 32-bit grey scaled to 0-255 (converting directly would clip 4096 levels to 17)."""
    arr = np.asarray(img, dtype=np.float64)
    top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
    if img.mode == "F":
        top = max(1.0, float(arr.max()))
    return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")


def load_image(path, background=(255, 255, 255)) -> Image.Image:
    """The image as 8-bit RGB: EXIF orientation applied, transparency flattened onto `background`,
    CMYK and 16-bit converted correctly, animations at their first frame. Truncated files are errors."""
    path = Path(path)
    img = _open(path)
    try:
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise ImgloraError(f"decompression bomb ({w * h / 1e6:.0f} MP)",
                               "remove it; no training image needs that many pixels", path=path)
        img.seek(0)
        img.load()  # full decode: a truncated JPEG passes verify() and fails only here
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            img = _to_8bit(img)
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        if img.mode in ("RGBA", "LA", "PA") or (img.mode in ("RGB", "L") and "transparency" in img.info):
            rgba = img.convert("RGBA")
            flat = Image.new("RGBA", rgba.size, tuple(background) + (255,))
            flat.alpha_composite(rgba)
            return flat.convert("RGB")
        return img.convert("RGB")
    except ImgloraError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        what = "truncated" if "truncated" in str(e) else f"undecodable ({e})"
        raise ImgloraError(f"{what} image", "remove it or copy it again", path=path) from None
    finally:
        img.close()

"""The pre-training scan: every image opened and checked in parallel, problems listed per file.

Reads only what is needed: the header for size, format and EXIF; then a decode check that is cheap
per format: JPEG decoded at 1/8 scale (the IDCT scaling still reads every byte, so a half JPEG fails,
RELIABILITY.md I2, although `verify()` passes), PNG's chunk checksums (`verify()` does catch a cut
PNG), anything else fully. Nothing is written.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from ..errors import ImgloraError
from .captions import Item
from . import MIN_IMAGE_SIDE
from .images import ImageInfo, decode_error, info_of, opened


@dataclass
class Problem:
    path: Path
    reason: str
    fix: str = ""


@dataclass
class ScanResult:
    ok: list[Item]
    problems: list[Problem]
    infos: dict[Path, ImageInfo] = field(default_factory=dict)  # every image whose header could be read


def inspect_image(path, data: bytes | None = None,
                  measure: Callable[[Image.Image, ImageInfo], Any] | None = None) -> tuple[ImageInfo, Any]:
    """Open once: header info, then the decode check. With `measure`, the image is decoded (JPEG at
    reduced scale) and `measure(decoded, info)` is returned too; `data` is the file's bytes if read."""
    with opened(path, data) as img:
        try:
            info = info_of(img, path)
            w, h = img.size
            if info.format in ("JPEG", "MPO"):
                # 1/8 scale where the hash needs little; 64 px keeps enough detail for a perceptual hash.
                img.draft("RGB" if img.mode == "RGB" else None, (max(64, w // 8), max(64, h // 8)))
                img.load()
            elif info.format == "PNG" and measure is None:
                img.verify()  # CRCs of every chunk: a cut or damaged PNG fails here, without inflating it
            else:
                img.load()
            return info, (measure(img, info) if measure else None)
        except ImgloraError:
            raise
        except Exception as e:  # decoder errors of every kind become one line naming the file
            raise decode_error(path, e) from None


def check_item(item: Item, min_side: int) -> tuple[ImageInfo | None, Problem | None]:
    """(header info or None, the first problem or None) of one training item."""
    try:
        info, _ = inspect_image(item.image)
    except ImgloraError as e:
        return None, Problem(item.image, e.what, e.fix)
    w, h = info.size
    if min(w, h) < min_side:
        return info, Problem(item.image, f"too small ({w}x{h}, under {min_side} px)",
                             "remove it or use a larger version")
    if item.problem:
        return info, Problem(item.image, item.problem, "add a caption file or pass --caption-fallback")
    return info, None


def parallel_map(fn, items: list, workers: int | None, desc: str, progress: bool = True) -> list:
    """fn over items on a thread pool, in order, with a progress bar on stderr (rate and ETA).

    Threads suffice: Pillow's decoders, zlib and hashlib release the GIL, and nothing is copied
    between processes."""
    workers = max(1, workers or min(8, (os.cpu_count() or 2) * 2))
    bar = tqdm(total=len(items), desc=desc, unit="img", file=sys.stderr, disable=not progress, delay=0.5,
               mininterval=0.25, dynamic_ncols=True)
    out = []
    with bar, ThreadPoolExecutor(max_workers=workers) as pool:
        for result in pool.map(fn, items, chunksize=1):
            out.append(result)
            bar.update()
    return out


def scan_items(items: list[Item], min_side: int = MIN_IMAGE_SIDE, workers: int | None = None,
               progress: bool = True) -> ScanResult:
    """Split items into usable ones and problems (one per bad file, with the reason and the fix)."""
    ok, problems, infos = [], [], {}
    results = parallel_map(lambda it: check_item(it, min_side), items, workers, "scanning images", progress)
    for item, (info, problem) in zip(items, results):
        if info is not None:
            infos[item.image] = info
        if problem is None:
            ok.append(item)
        else:
            problems.append(problem)
    return ScanResult(ok, problems, infos)

"""The pre-training scan: every image opened and checked in parallel, problems listed per file.

Reads only what is needed: the header for size and format, a 1/8-scale decode for JPEG (which still
reaches the end of the file, so truncation shows), PNG's chunk checksums. Nothing is written.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from ..errors import ImgloraError
from .captions import Item
from .images import ImageInfo, _open, probe_image


@dataclass
class Problem:
    path: Path
    reason: str
    fix: str = ""


@dataclass
class ScanResult:
    ok: list[Item]
    problems: list[Problem]
    infos: dict[Path, ImageInfo] = field(default_factory=dict)


def check_decodes(path: Path, info: ImageInfo) -> None:
    """Raise ImgloraError if the image data is cut short or corrupt."""
    try:
        with _open(path) as img:
            if info.format == "JPEG":
                img.draft("RGB", (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
                img.load()
            elif info.format == "PNG":
                img.verify()
            else:
                img.load()
    except ImgloraError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        what = "truncated image" if "truncated" in str(e) or "broken" in str(e) else f"corrupt image ({e})"
        raise ImgloraError(what, "remove it or copy it again", path=path) from None


def _check(item: Item, min_side: int):
    try:
        info = probe_image(item.image)
        check_decodes(item.image, info)
    except ImgloraError as e:
        return None, Problem(item.image, e.what, e.fix)
    if min(info.size) < min_side:
        return info, Problem(item.image, f"too small ({info.size[0]}x{info.size[1]}, under {min_side} px)",
                             "remove it or use a larger version")
    if item.problem:
        return info, Problem(item.image, item.problem, "add a caption file or pass --caption-fallback")
    return info, None


def scan_items(items: list[Item], min_side: int = 64, workers: int | None = None, progress: bool = True) -> ScanResult:
    """Split items into usable ones and problems (one per bad file, with the reason)."""
    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    ok, problems, infos = [], [], {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda it: _check(it, min_side), items)
        for item, (info, problem) in tqdm(zip(items, results), total=len(items), desc="scanning", unit="img",
                                          disable=not progress or len(items) < 200):
            if info is not None:
                infos[item.image] = info
            if problem is None:
                ok.append(item)
            else:
                problems.append(problem)
    return ScanResult(ok, problems, infos)

"""How fast `imglora-data check` and the trainer's pre-training scan go through a folder (files/s).

    python -m benchmarks.check_speed [--n 5000] [--size 256] [--workers N] [--repeat 3]

Generates a folder of `n` distinct captioned images (half PNG, half JPEG, a few sizes), cached in the
temp folder between runs, then times, best of `--repeat` (the page cache is warm after the first):
  - check: `check_folder` (every check: content hash, decode check, perceptual hash, captions, duplicates)
  - scan: `collect_items` + `scan_items` (what `imglora train` runs before step 1)
Prints one JSON line and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

SIZES = ((1.0, 1.0), (1.5, 1.0), (1.0, 1.5), (0.75, 1.0))  # w, h as multiples of --size


def make_folder(n: int, size: int, root: Path | None = None) -> Path:
    """n distinct images with .txt captions: random shapes on random backgrounds (cached by n and size)."""
    root = root or Path(tempfile.gettempdir()) / f"imglora-check-speed-{n}-{size}"
    done = root / ".complete"
    if done.exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(n):
        fw, fh = SIZES[i % len(SIZES)]
        w, h = int(size * fw), int(size * fh)
        img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x0, y0 = rng.randrange(w), rng.randrange(h)
            box = [x0, y0, x0 + rng.randrange(8, w // 2), y0 + rng.randrange(8, h // 2)]
            fill = tuple(rng.randrange(256) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        img.save(root / f"{i:06d}.{'png' if i % 2 else 'jpg'}", quality=90)
        (root / f"{i:06d}.txt").write_text(f"image {i}, shapes on a plain background\n")
    done.touch()
    return root


def best_of(repeat: int, fn) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return min(times), result


def run(n: int, size: int, workers: int | None, repeat: int) -> dict:
    from datasets_tools.check import check_folder
    from imglora.data.captions import collect_items
    from imglora.data.scan import scan_items

    t = time.perf_counter()
    folder = make_folder(n, size)
    made = time.perf_counter() - t
    mb = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
    check_s, report = best_of(repeat, lambda: check_folder(folder, workers=workers, progress=False))
    scan_s, scan = best_of(repeat, lambda: scan_items(collect_items(folder), workers=workers, progress=False))
    assert len(scan.ok) == n, f"{n - len(scan.ok)} generated images failed the scan"
    return {"benchmark": "check_speed", "images": n, "size": size, "folder_mb": round(mb, 1),
            "workers": workers or "default", "cpus": os.cpu_count(), "python": platform.python_version(),
            "generate_s": round(made, 2), "check_s": round(check_s, 3), "check_files_per_s": round(n / check_s),
            "check_problems": len(report.findings), "scan_s": round(scan_s, 3), "scan_files_per_s": round(n / scan_s)}


def markdown(r: dict) -> str:
    return "\n".join([
        f"| {r['images']} images ({r['size']} px, {r['folder_mb']} MB), {r['cpus']} CPUs | seconds | files/s |",
        "|---|---|---|",
        f"| `imglora-data check` | {r['check_s']:.2f} | {r['check_files_per_s']} |",
        f"| trainer scan (`collect_items` + `scan_items`) | {r['scan_s']:.2f} | {r['scan_files_per_s']} |",
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=5000, help="images in the folder")
    p.add_argument("--size", type=int, default=256, help="short side of the square images in pixels")
    p.add_argument("--workers", type=int, help="threads (default: the library's)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs; the best is reported")
    args = p.parse_args(argv)
    result = run(args.n, args.size, args.workers, args.repeat)
    print(json.dumps(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Dataset preparation against folder size: `imglora-data check`, the trainer's scan, latent caching.

    python -m benchmarks.run --suite data [--model tiny] [--data-sizes 100,1000,10000]

Folders of n distinct captioned images (half PNG, half JPEG, four aspect ratios) are generated once
and kept in the temp folder. Check and scan are timed best of three (the page cache is warm after the
first): check is `check_folder` (content hash, decode check, perceptual hash, captions, duplicates),
scan is `collect_items` + `scan_items`, what `imglora train` runs before step 1. Latent caching is the
chosen model's VAE encoding 500 of the images at its native resolution.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

ASPECTS = ((1.0, 1.0), (1.5, 1.0), (1.0, 1.5), (0.75, 1.0))  # w, h as multiples of the size


def make_folder(n: int, size: int = 128) -> Path:
    """n distinct images with .txt captions: random shapes on random backgrounds (cached by n and size)."""
    root = Path(tempfile.gettempdir()) / f"imglora-bench-data-{n}-{size}"
    done = root / ".complete"
    if done.exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(n):
        fw, fh = ASPECTS[i % len(ASPECTS)]
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


def bench_data(model, args) -> dict:
    from datasets_tools.check import check_folder
    from imglora.data.captions import collect_items
    from imglora.data.scan import scan_items

    out = {}
    for n in args.data_sizes:
        folder = make_folder(n)
        check_s, report = best_of(3, lambda: check_folder(folder, progress=False))
        scan_s, scan = best_of(3, lambda: scan_items(collect_items(folder), progress=False))
        assert len(scan.ok) == n, f"{n - len(scan.ok)} generated images failed the scan"
        out[f"check_{n}_s"] = check_s
        out[f"check_{n}_files_per_s"] = n / check_s
        out[f"check_{n}_problems"] = len(report.findings)
        out[f"scan_{n}_s"] = scan_s
        out[f"scan_{n}_files_per_s"] = n / scan_s
    from imglora.pipeline import load_model
    from imglora.train.data import Example, LatentCache, vae_fingerprint

    loaded = load_model(model)
    pipe, res = loaded.pipe, loaded.resolution
    examples = [Example(p, "x", (res, res)) for p in sorted(make_folder(1000).glob("*.png"))[:500]]
    cache = LatentCache(pipe.vae, None, vae_fingerprint(pipe.vae))
    t = time.perf_counter()
    cache.fill(examples, (False,), progress=False)
    out["latent_cache_images_per_s"] = len(examples) / (time.perf_counter() - t)
    out["latent_cache_resolution"] = res
    return out

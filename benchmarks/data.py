"""Dataset preparation against folder size: `imglora-data check`, the trainer's scan, latent caching.

    python -m benchmarks.run --suite data [--model tiny]      (files per second for 1k and 10k images)
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

from PIL import Image


def make_folder(root: Path, n: int, size: int = 128) -> Path:
    """n captioned images, half PNG, half JPEG (cached between runs in the same root)."""
    from imglora.data.synth import BASE_SHAPES, COLOURS, render

    if root.is_dir() and len(list(root.glob("*.txt"))) == n:
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    seeds = [render(s, c, "white", size, rng) for s in BASE_SHAPES for c in COLOURS]
    for i in range(n):
        img = seeds[i % len(seeds)].rotate(i % 360, fillcolor=(240, 240, 240))  # distinct content per file
        img.save(root / f"{i:05d}.{'png' if i % 2 else 'jpg'}")
        (root / f"{i:05d}.txt").write_text(f"image {i}, a shape")
    return root


def bench_data(args, sizes=(1000, 10000)) -> dict:
    from datasets_tools.check import check_folder
    from imglora.data.captions import collect_items
    from imglora.data.scan import scan_items

    out = {}
    base = Path(tempfile.gettempdir()) / "imglora-bench-data"
    for n in sizes:
        folder = make_folder(base / str(n), n)
        t = time.perf_counter()
        findings = check_folder(folder, progress=False)
        dt = time.perf_counter() - t
        out[f"check_{n}_s"] = dt
        out[f"check_{n}_files_per_s"] = n / dt
        out[f"check_{n}_problems"] = len(findings)
        t = time.perf_counter()
        scan = scan_items(collect_items(folder), progress=False)
        dt = time.perf_counter() - t
        out[f"scan_{n}_files_per_s"] = n / dt
        assert len(scan.ok) == n
    # Latent caching through the VAE of the chosen model, 1,000 images at its resolution.
    from imglora.models.load import load_pipeline, model_defaults
    from imglora.train.data import Example, LatentCache, vae_fingerprint

    pipe = load_pipeline(None if args.model == "tiny" else args.model)
    res = model_defaults(pipe).get("resolution") or pipe.unet.config.sample_size * pipe.vae_scale_factor
    folder = base / "1000"
    examples = [Example(p, "x", (res, res)) for p in sorted(folder.glob("*.png"))[:500]]
    cache = LatentCache(pipe.vae, None, vae_fingerprint(pipe.vae))
    t = time.perf_counter()
    cache.fill(examples, (False,), batch=32, progress=False)
    out["latent_cache_images_per_s"] = len(examples) / (time.perf_counter() - t)
    out["latent_cache_resolution"] = res
    return out


if __name__ == "__main__":
    import argparse
    import json

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="tiny")
    print(json.dumps(bench_data(p.parse_args()), indent=1))

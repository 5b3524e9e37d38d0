"""`imglora-data resize DIR OUT`: upright, flattened, resized copies (to a max side or to the trainer's
buckets), captions copied beside them. Never writes into DIR."""

from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from imglora.data.buckets import assign_bucket, fit_to_bucket, make_buckets
from imglora.data.captions import _walk
from imglora.data.images import load_image
from imglora.errors import ImgloraError
from imglora.formats.files import atomic_write

FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


def resize_folder(root, out, max_side: int | None = None, buckets_at: int | None = None, step: int = 64,
                  background=(255, 255, 255), fmt: str = "png", quality: int = 95, overwrite: bool = False):
    """Returns (written, skipped): skipped lists (path, reason) for images that could not be read."""
    root, out = Path(root).resolve(), Path(out).resolve()
    if out == root or root in out.parents:
        raise ImgloraError("the output folder is inside the input folder", "choose an OUT outside DIR", path=out)
    buckets = make_buckets(buckets_at, step) if buckets_at else None
    written, skipped = [], []
    for image in tqdm(list(_walk(root)), desc="resizing", unit="img"):
        try:
            img = load_image(image, background)
        except ImgloraError as e:
            skipped.append((image, e.what))
            continue
        if buckets:
            img = fit_to_bucket(img, assign_bucket(*img.size, buckets, step=step), "center")[0]
        elif max_side and max(img.size) > max_side:
            scale = max_side / max(img.size)
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                             Image.Resampling.LANCZOS)
        dest = (out / image.relative_to(root)).with_suffix("." + fmt)
        kwargs = {"quality": quality} if fmt in ("jpg", "webp") else {}
        atomic_write(dest, lambda f, im=img: im.save(f, format=FORMATS[fmt], **kwargs), overwrite=overwrite)
        for ext in (".txt", ".caption"):
            if image.with_suffix(ext).is_file() and (overwrite or not dest.with_suffix(ext).exists()):
                shutil.copyfile(image.with_suffix(ext), dest.with_suffix(ext))
        written.append(dest)
    if (root / "metadata.jsonl").is_file():
        shutil.copyfile(root / "metadata.jsonl", out / "metadata.jsonl")
    return written, skipped

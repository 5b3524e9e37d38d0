"""`imglora-data resize DIR OUT`: upright, flattened, resized copies (to a max side, or cropped to the
trainer's buckets), with their captions. Never writes into DIR; refuses to replace files in OUT
unless --overwrite, and checks that before writing anything."""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image

from imglora.data.buckets import assign_bucket, fit_to_bucket, make_buckets
from imglora.data.captions import CAPTION_EXTENSIONS, read_caption, read_metadata, walk
from imglora.data.images import load_image, probe_image
from imglora.data.scan import parallel_map
from imglora.errors import ImgloraError
from imglora.formats.files import atomic_write

FORMATS = {"png": ("PNG", ".png"), "jpg": ("JPEG", ".jpg"), "webp": ("WEBP", ".webp")}


def refuse_inside(root, out) -> None:
    """An output path inside the input folder is refused: the input folder is never written."""
    root, out = Path(root).resolve(), Path(out).resolve()
    if out == root or root in out.parents:
        raise ImgloraError("the output is inside the input folder", "choose an output outside DIR", path=out)


def _target(image: Path, fmt: str) -> tuple[str, str]:
    """(Pillow format, extension) an image is written as."""
    if fmt == "keep":
        return ("JPEG", image.suffix) if image.suffix.lower() in (".jpg", ".jpeg", ".jpe", ".jfif") else \
            ("PNG", ".png")
    return FORMATS[fmt]


def resize_folder(root, out, max_side: int | None = None, buckets_at: int | None = None, step: int = 64,
                  background=(255, 255, 255), fmt: str = "keep", quality: int = 95, overwrite: bool = False,
                  no_upscale: bool = False, workers: int | None = None, progress: bool = True):
    """Returns (written, skipped): skipped lists (path, reason) for images that could not be read."""
    root, out = Path(root), Path(out)
    refuse_inside(root, out)
    if max_side and buckets_at:
        raise ImgloraError("--max-side and --buckets both given", "use one")
    buckets = make_buckets(buckets_at, step) if buckets_at else None
    found = walk(root)
    plan = {}
    for image in found.images:
        pil_format, ext = _target(image, fmt)
        dest = (out / image.relative_to(root)).with_suffix(ext)
        if dest in plan.values():
            other = next(k for k, v in plan.items() if v == dest)
            raise ImgloraError(f"{image.name} and {other.name} would both be written as {dest.name}",
                               "rename one of them", path=image)
        plan[image] = dest
    captions = {}
    for image, dest in plan.items():
        for ext in CAPTION_EXTENSIONS:
            if image.with_suffix(ext).is_file():
                captions[image.with_suffix(ext)] = dest.with_suffix(ext)
    metadata = {m: out / m.relative_to(root) for m in found.metadata}
    for meta in metadata:
        read_metadata(meta)  # a malformed file stops here, before anything is written
    if not overwrite:
        for dest in [*plan.values(), *captions.values(), *metadata.values()]:
            if dest.exists():
                raise ImgloraError("already exists", "choose an empty OUT or pass --overwrite", path=dest)

    def one(image: Path):
        try:
            img = load_image(image, background)
        except ImgloraError as e:
            return image, e.what
        if buckets:
            info = probe_image(image)
            img = fit_to_bucket(img, assign_bucket(*info.size, buckets, no_upscale=no_upscale, step=step))[0]
        elif max_side and max(img.size) > max_side:
            scale = max_side / max(img.size)
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                             Image.Resampling.LANCZOS, reducing_gap=3.0)
        pil_format = _target(image, fmt)[0]
        kwargs = {"quality": quality} if pil_format in ("JPEG", "WEBP") else {}
        atomic_write(plan[image], lambda f: img.save(f, format=pil_format, **kwargs), overwrite=overwrite)
        return image, None

    results = parallel_map(one, list(plan), workers, "resizing", progress)
    skipped = list(found.skipped) + [(image, why) for image, why in results if why]  # folders: unreadable, loops
    written = [plan[image] for image, why in results if not why]
    for side, dest in captions.items():
        atomic_write(dest, lambda f, s=side: f.write(s.read_bytes()), overwrite=overwrite)
    renamed = {str(image): dest for image, dest in plan.items()}
    for meta, dest in metadata.items():
        atomic_write(dest, lambda f, m=meta: f.write(_renamed_rows(m, renamed).encode("utf-8")), overwrite=overwrite)
    return written, skipped


def _renamed_rows(meta: Path, renamed: dict[str, Path]) -> str:
    """metadata.jsonl with each file_name following its image's new extension."""
    rows = []
    for line in read_caption(meta).splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        old = os.path.normpath(meta.parent / row["file_name"])
        if old in renamed:
            row["file_name"] = Path(row["file_name"]).with_suffix(renamed[old].suffix).as_posix()
        rows.append(json.dumps(row, ensure_ascii=False) + "\n")
    return "".join(rows)

"""`imglora-data convert DIR --to jsonl|sidecar`: between metadata.jsonl and sidecar captions; a kohya
repeat-folder layout (captioned by folder name) converts too. Only new files are written."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from imglora.data.captions import collect_items
from imglora.errors import ImgloraError
from imglora.formats.files import atomic_write


def convert(root, to: str, overwrite: bool = False) -> list[Path]:
    """Write metadata.jsonl per folder (to=jsonl) or a .txt per image (to=sidecar); returns files written."""
    root = Path(root)
    # Captions from every source; an image without one is captioned by its (kohya concept) folder name.
    items = collect_items(root, fallback="folder")
    written = []
    if to == "sidecar":
        for item in items:
            caption = item.caption
            dest = item.image.with_suffix(".txt")
            if dest.exists() and not overwrite:
                continue
            atomic_write(dest, lambda f, c=caption: f.write((c + "\n").encode("utf-8")), overwrite=overwrite)
            written.append(dest)
        return written
    if to != "jsonl":
        raise ImgloraError(f"unknown target {to!r}", "use --to jsonl or --to sidecar")
    rows = defaultdict(list)
    for item in items:
        row = {"file_name": item.image.name, "text": item.caption}
        if item.repeats > 1:
            row["repeats"] = item.repeats
        rows[item.image.parent].append(row)
    for folder, entries in rows.items():
        dest = folder / "metadata.jsonl"
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in entries)
        atomic_write(dest, lambda f, t=text: f.write(t.encode("utf-8")), overwrite=overwrite)
        written.append(dest)
    return written

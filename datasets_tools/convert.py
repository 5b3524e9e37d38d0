"""`imglora-data convert DIR --to jsonl|sidecar`: between metadata.jsonl and sidecar captions; a kohya
repeat-folder layout (`10_name/`, captioned by the folder name where an image has no caption file)
converts too.

In place, it only adds caption files (an existing one is replaced only with --overwrite, after a
backup, through the same path as `caption`); with --out it writes a converted copy and DIR is untouched.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

from imglora.data.captions import METADATA, collect_items, concept, read_caption, repeat_folder, sidecar
from imglora.errors import ImgloraError
from imglora.formats.files import atomic_write

from .resize import refuse_inside


def captions_of(root: Path) -> tuple[list[tuple[Path, str, int]], list[str]]:
    """[(image, caption, repeats)] from every source, kohya folders captioned by name; notes on the rest."""
    out, missing, notes = [], 0, []
    for item in collect_items(root, log=notes.append, contained=True):
        caption = item.caption
        if caption is None and item.problem in ("missing caption", "empty caption"):
            in_kohya = any(repeat_folder(p)[0] for p in item.image.parent.relative_to(root.parent).parts)
            caption = concept(item.image.parent, root)[0] if in_kohya else None
        if caption is None:
            missing += 1
            continue
        out.append((item.image, caption, item.repeats))
    if missing:
        notes.append(f"{missing} image(s) without a usable caption were left out (`imglora-data check` lists them)")
    return out, notes


def layout(root: Path, to: str, one_file: bool = False) -> tuple[dict[Path, str], list[str]]:
    """{caption file under root: its text} in the target layout, and notes."""
    if to not in ("jsonl", "sidecar"):
        raise ImgloraError(f"unknown target {to!r}", "use --to jsonl or --to sidecar")
    items, notes = captions_of(root)
    if to == "sidecar":
        files = {}
        for image, caption, _ in items:
            files[sidecar(image) or image.with_suffix(".txt")] = caption
        return files, notes
    rows = defaultdict(list)
    for image, caption, repeats in items:
        folder = root if one_file else image.parent
        row = {"file_name": image.relative_to(folder).as_posix(), "text": caption}
        if repeats > 1:
            row["repeats"] = repeats  # an extra column for datasets; imglora reads repeats from the folder name
        rows[folder / METADATA].append(json.dumps(row, ensure_ascii=False))
    return {path: "\n".join(lines) for path, lines in rows.items()}, notes


def convert(root, to: str, one_file: bool = False, overwrite: bool = False):
    """(changes for caption.apply: [(file, old text or None, new text)], notes), in place."""
    root = Path(root)
    files, notes = layout(root, to, one_file)
    changes, kept = [], []
    for path, text in files.items():
        old = read_caption(path) if path.is_file() else None
        if old is not None and old.strip() == text.strip():
            continue
        if old is not None and not overwrite:
            kept.append(path)
            continue
        changes.append((path, old, text))
    if kept:
        notes.append(f"{len(kept)} existing file(s) differ and were kept (first: {kept[0]}); --overwrite "
                     "replaces them, with a backup")
    return changes, notes


def _copy(src: Path, f) -> None:
    with open(src, "rb") as g:
        shutil.copyfileobj(g, f)


def copy_dataset(root, out, to: str, one_file: bool = False,
                 overwrite: bool = False) -> tuple[list[Path], list[str]]:
    """A converted copy of DIR in OUT: images hard-linked where possible (else copied), new captions; and notes."""
    root, out = Path(root), Path(out)
    refuse_inside(root, out)
    items, _ = captions_of(root)
    files, notes = layout(root, to, one_file)
    targets = [out / image.relative_to(root) for image, _, _ in items] + [out / p.relative_to(root) for p in files]
    if not overwrite:
        for dest in targets:
            if dest.exists():
                raise ImgloraError("already exists", "choose an empty OUT or pass --overwrite", path=dest)
    written = []
    for image, _, _ in items:
        dest = out / image.relative_to(root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if overwrite and dest.exists():
            dest.unlink()
        try:
            os.link(image, dest)
        except OSError:  # another file system, or links not allowed
            atomic_write(dest, lambda f, s=image: _copy(s, f), overwrite=overwrite)
        written.append(dest)
    for path, text in files.items():
        dest = out / path.relative_to(root)
        atomic_write(dest, lambda f, t=text: f.write((t + "\n").encode("utf-8")), overwrite=overwrite)
        written.append(dest)
    return written, notes

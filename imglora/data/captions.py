"""Finding images and their captions: sidecar files, metadata.jsonl, kohya repeat folders, fallbacks."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImgloraError
from .images import IMAGE_EXTENSIONS

REPEAT_DIR = re.compile(r"^(\d+)_(.+)$")  # kohya: "10_mychar" = 10 repeats of the concept "mychar"


@dataclass
class Item:
    image: Path
    caption: str | None
    repeats: int = 1
    problem: str | None = None


def read_caption(path) -> str:
    """A caption file's text: strict UTF-8 (a BOM is allowed), whitespace collapsed at the ends."""
    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise ImgloraError("caption is not UTF-8 text", "re-save it as UTF-8", path=path) from None
    except OSError as e:
        raise ImgloraError(f"unreadable caption ({e.strerror})", "check the file", path=path) from None


def _jsonl_captions(folder: Path) -> dict[str, str]:
    """file_name -> text (or caption) from a Hugging Face imagefolder metadata.jsonl."""
    meta = folder / "metadata.jsonl"
    out: dict[str, str] = {}
    if not meta.is_file():
        return out
    for n, line in enumerate(meta.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text = row.get("text", row.get("caption"))
            out[str(row["file_name"])] = text if isinstance(text, str) else ""
        except (ValueError, KeyError, AttributeError):
            raise ImgloraError(f"line {n} is not a JSON object with file_name and text",
                               "fix metadata.jsonl (one {\"file_name\": ..., \"text\": ...} per line)",
                               path=meta) from None
    return out


def _walk(root: Path):
    """Image files under root, sorted, following no symlinked folders (no loops)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.suffix.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                yield p


def _concept(folder: Path, root: Path) -> tuple[str, int]:
    """(folder name without a kohya N_ prefix, repeats) for the nearest repeat folder, else (name, 1)."""
    for part in reversed(folder.relative_to(root.parent).parts):
        m = REPEAT_DIR.match(part)
        if m:
            return m[2].replace("_", " "), int(m[1])
    return folder.name.replace("_", " "), 1


def _fallback(rule: str, image: Path, folder_name: str) -> str:
    if rule == "folder":
        return folder_name
    if rule == "filename":
        return re.sub(r"[_\-]+", " ", re.sub(r"\s*\(\d+\)$", "", image.stem)).strip()
    return rule.format(folder=folder_name, stem=image.stem)


def collect_items(root, caption_extensions=(".txt", ".caption"), fallback: str | None = None,
                  prefix: str | None = None) -> list[Item]:
    """Every image under `root` with its caption, in a fixed order."""
    root = Path(root)
    jsonl: dict[Path, dict[str, str]] = {}
    items = []
    for image in _walk(root):
        folder = image.parent
        if folder not in jsonl:
            jsonl[folder] = _jsonl_captions(folder)
        concept, repeats = _concept(folder, root)
        caption, problem = None, None
        for ext in caption_extensions:
            side = image.with_suffix(ext)
            if side.is_file():
                try:
                    caption = read_caption(side)
                except ImgloraError as e:
                    problem = e.what
                break
        else:
            if image.name in jsonl[folder]:
                caption = jsonl[folder][image.name].strip()
        if not caption and problem is None:
            if fallback:
                caption = _fallback(fallback, image, concept)
            else:
                problem = "empty caption" if caption == "" else "missing caption"
                caption = None
        if caption and prefix and not caption.startswith(prefix):
            caption = f"{prefix}, {caption}" if "," in caption else f"{prefix} {caption}"
        items.append(Item(image, caption, repeats, problem))
    return items

"""`imglora-data caption DIR`: bulk edits of sidecar captions, with a diff preview and a backup.

Captions are comma-separated tags (a sentence is one tag). Edits apply in this order: create missing
captions, replace tags, remove tags, de-duplicate, add the prefix/trigger word. Every changed file is
copied to DIR/.imglora-backup/TIME/ before it is rewritten; `--dry-run` only shows the diff.
"""

from __future__ import annotations

import difflib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from imglora.data.captions import _concept, _fallback, _walk, read_caption
from imglora.errors import ImgloraError
from imglora.formats.files import atomic_write

BACKUP_DIR = ".imglora-backup"


@dataclass
class Edits:
    create_missing: str | None = None  # filename | folder | a template with {folder} and {stem}
    replace: dict[str, str] = field(default_factory=dict)
    remove: list[str] = field(default_factory=list)
    dedupe: bool = False
    prefix: str | None = None

    def apply(self, caption: str) -> str:
        tags = [t.strip() for t in caption.split(",") if t.strip()] if "," in caption else (
            [caption.strip()] if caption.strip() else [])
        tags = [self.replace.get(t, t) for t in tags]
        tags = [t for t in tags if t not in self.remove and t]
        if self.dedupe:
            tags = list(dict.fromkeys(tags))
        text = ", ".join(tags)
        if self.prefix and not text.startswith(self.prefix):
            text = f"{self.prefix}, {text}" if "," in text else f"{self.prefix} {text}".strip()
        return text


def plan(root, edits: Edits, extension: str = ".txt") -> list[tuple[Path, str | None, str]]:
    """(caption file, old text or None if new, new text) for every file that would change."""
    root = Path(root)
    changes = []
    for image in _walk(root):
        side = image.with_suffix(extension)
        if side.is_file():
            old = read_caption(side)
        elif edits.create_missing:
            old = None
        else:
            continue
        base = old if old is not None else _fallback(edits.create_missing, image, _concept(image.parent, root)[0])
        new = edits.apply(base)
        if new != old:
            changes.append((side, old, new))
    return changes


def diff(changes, root) -> str:
    out = []
    for path, old, new in changes:
        rel = str(Path(path).relative_to(root))
        out += difflib.unified_diff([] if old is None else [old + "\n"], [new + "\n"],
                                    "/dev/null" if old is None else f"a/{rel}", f"b/{rel}")
    return "".join(out)


def apply(root, changes) -> Path | None:
    """Back up every file that changes (and list the new ones), then write each atomically."""
    if not changes:
        return None
    root = Path(root)
    backup = root / BACKUP_DIR / time.strftime("%Y%m%d-%H%M%S")
    if backup.exists():
        raise ImgloraError("a backup from this second already exists", "run again in a second", path=backup)
    created = []
    for path, old, _ in changes:
        rel = Path(path).relative_to(root)
        if old is None:
            created.append(str(rel))
        else:
            (backup / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, backup / rel)
    backup.mkdir(parents=True, exist_ok=True)
    (backup / "manifest.json").write_text(json.dumps({"created": created}, indent=1))
    for path, _, new in changes:
        atomic_write(path, lambda f, text=new: f.write((text + "\n").encode("utf-8")), overwrite=True)
    return backup

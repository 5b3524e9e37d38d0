"""`imglora-data caption DIR`: bulk edits of sidecar captions, with a diff preview and a backup.

Captions are comma-separated tags (a sentence without commas is one tag). Edits apply in this order:
create missing captions, replace tags, remove tags, de-duplicate, add the trigger word/prefix. Every
file that changes is first copied to DIR/.imglora-backup/TIME/ (a hidden folder, which the trainer
and the other commands skip) with a manifest of the files created; `--restore` puts them back.
This is the one command that writes into DIR.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from imglora.data.captions import (CAPTION_EXTENSIONS, add_prefix, check_fallback, concept, fallback_caption,
                                   metadata_captions, read_caption, sidecar, walk)
from imglora.errors import ImgloraError, shown
from imglora.formats.files import TMP_MARK, atomic_write, clean_temp_files

BACKUP_DIR = ".imglora-backup"
MANIFEST = "manifest.json"


@dataclass
class Edits:
    create_missing: str | None = None  # filename | folder | a template with {folder} and {stem}
    replace: dict[str, str] = field(default_factory=dict)
    remove: list[str] = field(default_factory=list)
    dedupe: bool = False
    prefix: str | None = None

    def is_empty(self) -> bool:
        return not (self.create_missing or self.replace or self.remove or self.dedupe or self.prefix)

    def apply(self, caption: str) -> str:
        tags = [t.strip() for t in caption.split(",")] if "," in caption else [caption.strip()]
        tags = [t for t in tags if t]
        new = [self.replace.get(t, t) for t in tags]
        new = [t for t in new if t and t not in self.remove]
        if self.dedupe:
            new = list(dict.fromkeys(new))
        text = caption.strip() if new == tags else ", ".join(new)  # untouched tags keep their spacing
        return add_prefix(text, self.prefix)


def plan(root, edits: Edits, extension: str = ".txt") -> tuple[list[tuple[Path, str | None, str]], list[str]]:
    """([(caption file, old text or None if new, new text)] for every file that would change, notes)."""
    root = Path(root)
    check_fallback(edits.create_missing)
    if not extension.startswith(".") or "/" in extension:
        raise ImgloraError(f"--extension {extension!r}", "use e.g. --extension .txt")
    found = walk(root, contained=True)  # a linked folder elsewhere (another dataset) is never rewritten
    in_jsonl = metadata_captions(found.metadata)
    changes, skipped_jsonl = [], 0
    for image in found.images:
        side = sidecar(image, tuple(dict.fromkeys((extension, *CAPTION_EXTENSIONS))))
        if side is not None:
            old = read_caption(side)  # a non-UTF-8 file stops the plan before anything is written
            base = old
        elif image in in_jsonl:
            skipped_jsonl += 1  # a new sidecar would hide its metadata.jsonl caption from the trainer
            continue
        elif edits.create_missing:
            side, old = image.with_suffix(extension), None
            base = fallback_caption(edits.create_missing, image, concept(image.parent, root)[0])
        else:
            continue
        new = edits.apply(base)
        if new != old and new:
            changes.append((side, old, new))
    notes = [f"{skipped_jsonl} image(s) captioned in metadata.jsonl were left alone; `imglora-data convert "
             f"--to sidecar` first to edit them"] if skipped_jsonl else []
    notes += [f"folder {shown(p)}: skipped, {why}" for p, why in found.skipped]
    return changes, notes


def diff(changes, root) -> str:
    """A unified diff of the planned changes (new files against /dev/null)."""
    out = []
    for path, old, new in changes:
        rel = shown(Path(path).relative_to(root).as_posix())
        out += difflib.unified_diff([] if old is None else [old + "\n"], [new + "\n"],
                                    "/dev/null" if old is None else f"a/{rel}", f"b/{rel}")
    return "".join(out)


def new_backup_folder(root: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        folder = root / BACKUP_DIR / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise ImgloraError("cannot make a new backup folder", "clean up old backups", path=root / BACKUP_DIR)


class Backup:
    """One backup folder for changes written in steps (auto-captioning writes a batch at a time, so a long
    run that stops keeps what it finished). Each step copies the originals and rewrites the manifest before
    it writes a caption, so `--restore` undoes every step that began."""

    def __init__(self, root):
        self.root = Path(root)
        self.folder: Path | None = None
        self.created: list[str] = []
        self.changed: list[str] = []

    def write(self, changes) -> None:
        if not changes:
            return
        if self.folder is None:
            self.folder = new_backup_folder(self.root)
        for path, old, _ in changes:
            rel = Path(path).relative_to(self.root)
            if old is None or not Path(path).exists():
                self.created.append(rel.as_posix())
            else:
                (self.folder / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, self.folder / rel)
            if old is not None:
                self.changed.append(rel.as_posix())
        manifest = json.dumps({"created": self.created, "changed": self.changed}, indent=1)
        atomic_write(self.folder / MANIFEST, lambda f: f.write(manifest.encode()), overwrite=True)
        for path, _, new in changes:
            atomic_write(path, lambda f, text=new: f.write((text + "\n").encode("utf-8")), overwrite=True)


def apply(root, changes) -> Path | None:
    """Back up every file that changes (and list the new ones), then write each atomically."""
    backup = Backup(root)
    backup.write(changes)
    return backup.folder


def restore(root, backup) -> list[Path]:
    """Undo one `apply`: copy the backed-up files back and delete the files it created."""
    root, backup = Path(root).resolve(), Path(backup).resolve()
    if backup.parent != root / BACKUP_DIR or not (backup / MANIFEST).is_file():
        raise ImgloraError("not a caption backup of this folder", f"pass a folder inside {root / BACKUP_DIR}",
                           path=backup)
    manifest = json.loads((backup / MANIFEST).read_text())
    for rel in manifest.get("changed", []) + manifest.get("created", []):
        if root not in (root / rel).resolve().parents:
            raise ImgloraError(f"the manifest names {rel!r}, outside the folder", "restore by hand", path=backup)
    done = []
    for rel in manifest.get("changed", []):
        src = backup / rel
        atomic_write(root / rel, lambda f, s=src: f.write(s.read_bytes()), overwrite=True)
        done.append(root / rel)
    for rel in manifest.get("created", []):
        if (root / rel).is_file():
            os.unlink(root / rel)
            done.append(root / rel)
    return done


def clean_leftovers(folder) -> list[Path]:
    """Remove what a killed run left under `folder`: the temp files and temp folders of atomic writes (their
    names hold formats.files.TMP_MARK), and backup folders that never got their manifest (a run writes
    captions only after the manifest, so nothing was changed after such a backup). Links are not followed."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for dirpath, dirnames, _ in os.walk(folder):
        here = Path(dirpath)
        removed += clean_temp_files(here)
        for name in [d for d in dirnames if d.startswith(".") and TMP_MARK in d]:
            shutil.rmtree(here / name, ignore_errors=True)
            removed.append(here / name)
            dirnames.remove(name)
    backups = folder / BACKUP_DIR
    for backup in sorted(backups.iterdir()) if backups.is_dir() else []:
        if backup.is_dir() and not backup.is_symlink() and not (backup / MANIFEST).is_file():
            shutil.rmtree(backup, ignore_errors=True)
            removed.append(backup)
    return removed

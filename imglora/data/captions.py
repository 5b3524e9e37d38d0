"""Finding images and their captions: sidecar files, metadata.jsonl, kohya repeat folders, fallbacks.

Precedence per image: a sidecar (`a.txt`, then `a.caption`), else the nearest `metadata.jsonl` row
naming it (Hugging Face imagefolder: `file_name` relative to that file's folder, `text` or
`caption`), else the fallback. The trainer and `imglora-data` both read folders only through here.
"""

from __future__ import annotations

import json
import os
import re
import string
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ImgloraError, shown
from .images import IMAGE_EXTENSIONS

REPEAT_DIR = re.compile(r"^(\d+)_(.+)$")  # kohya: "10_mychar" = 10 repeats of the concept "mychar"
MAX_REPEATS = 1000  # above this a number is a year, a date or an index ("2024_photos"), not a repeat count
METADATA = "metadata.jsonl"
CAPTION_EXTENSIONS = (".txt", ".caption")


@dataclass
class Item:
    image: Path
    caption: str | None
    repeats: int = 1
    problem: str | None = None


@dataclass
class Walk:
    """What a folder holds: images, other files, metadata.jsonl files, and folders that were skipped."""
    images: list[Path] = field(default_factory=list)
    others: list[Path] = field(default_factory=list)
    metadata: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (folder, why): symlink loops, unreadable


def walk(root, contained: bool = False) -> Walk:
    """Every file under root in sorted order (hidden files and folders left out). Symlinked folders
    are followed, each real folder once, so a link back up the tree cannot loop. contained: a linked
    folder that lies outside root is skipped (with its reason), for tools that write beside the images."""
    root = Path(root)
    if not root.is_dir():
        raise ImgloraError("no such folder", "pass the folder of training images", path=root)
    out = Walk()
    seen: set[str] = set()

    def unreadable(e: OSError):
        out.skipped.append((Path(e.filename), f"unreadable folder ({e.strerror})"))

    top = os.path.realpath(root).rstrip(os.sep) + os.sep
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=unreadable):
        real = os.path.realpath(dirpath)
        if contained and not (real + os.sep).startswith(top):
            out.skipped.append((Path(dirpath), f"links outside the folder ({real}); left unchanged"))
            dirnames[:] = []
            continue
        if real in seen:
            ancestor = os.path.realpath(os.path.dirname(dirpath))
            loop = ancestor == real or ancestor.startswith(real.rstrip(os.sep) + os.sep)
            out.skipped.append((Path(dirpath), "symlink loop (links back to a folder above it)" if loop else
                                f"folder already included through another path ({real})"))
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        folder = Path(dirpath)
        for name in sorted(filenames):
            if name.startswith("."):  # .DS_Store, ._x.jpg (AppleDouble), .imglora-backup, temp files
                continue
            path = folder / name
            if name == METADATA:
                out.metadata.append(path)
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                out.images.append(path)
            else:
                out.others.append(path)
    return out


def read_caption(path) -> str:
    """A caption file's text: strict UTF-8 (a BOM is allowed), whitespace stripped at the ends."""
    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise ImgloraError(f"caption is not UTF-8 text (byte {e.start})", "re-save it as UTF-8", path=path) from None
    except OSError as e:
        raise ImgloraError(f"unreadable caption ({e.strerror})", "check the file", path=path) from None


def read_metadata(path) -> dict[Path, str]:
    """{image path: caption} from a metadata.jsonl; `file_name` is relative to the file's folder."""
    path = Path(path)
    text = read_caption(path)  # the same strict UTF-8 rule
    out: dict[Path, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = row["file_name"]
            if not isinstance(name, str) or not name:
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise ImgloraError(f"line {n} is not a JSON object with a file_name",
                               'fix it: one {"file_name": "a.png", "text": "..."} per line', path=path) from None
        caption = row.get("text", row.get("caption"))
        out[Path(os.path.normpath(path.parent / name))] = caption.strip() if isinstance(caption, str) else ""
    return out


def metadata_captions(files: list[Path]) -> dict[Path, str]:
    """Captions from every metadata.jsonl; where two name one image, the deeper file wins."""
    captions: dict[Path, str] = {}
    for meta in sorted(files, key=lambda p: len(p.parts)):
        captions.update(read_metadata(meta))
    return captions


def repeat_folder(name: str) -> tuple[int | None, str | None]:
    """kohya's `N_name` rule, where N is plausible: (N, None) for a repeat folder; (None, why not) for a name
    that only looks like one ("2024_photos", "0_x"); (None, None) for any other name."""
    m = REPEAT_DIR.match(name)
    if not m:
        return None, None
    n = int(m[1])
    if 1 <= n <= MAX_REPEATS:
        return n, None
    return None, f"{n} repeats is implausible; repeat folders have 1 to {MAX_REPEATS}"


def concept(folder: Path, root: Path) -> tuple[str, int]:
    """(folder name without a kohya N_ prefix, repeats) of the nearest repeat folder, else (name, 1)."""
    for part in reversed(folder.relative_to(root.parent).parts):
        repeats, _ = repeat_folder(part)
        if repeats:
            return REPEAT_DIR.match(part)[2].replace("_", " "), repeats
    return folder.name.replace("_", " "), 1


def folder_notes(root, found: Walk, skipped: bool = True) -> list[str]:
    """What was decided about the folders: each `N_name` folder holding images read as N repeats or not
    (and why), and (with `skipped`) each folder that was skipped (unreadable, a symlink loop), one line each."""
    root = Path(root)
    folders = {root}
    for image in found.images:
        folders.update(p for p in image.parents if p == root or root in p.parents)
    notes = []
    for folder in sorted(folders, key=lambda p: p.parts):
        repeats, why = repeat_folder(folder.name)
        if repeats:
            notes.append(f"folder {shown(folder)}: {repeats} repeat{'s' if repeats > 1 else ''}")
        elif why:
            notes.append(f"folder {shown(folder)}: not a repeat folder ({why}); its images count once")
    notes += [f"folder {shown(p)}: skipped, {why}" for p, why in found.skipped] if skipped else []
    return notes


def print_note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


def check_fallback(rule: str | None) -> None:
    """Refuse a template that names fields other than {folder} and {stem}."""
    if rule in (None, "", "folder", "filename"):
        return
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(rule) if f is not None}
    except ValueError as e:
        raise ImgloraError(f"caption template {rule!r} is malformed ({e})", "use e.g. 'a photo of {folder}'") from None
    if fields - {"folder", "stem"}:
        raise ImgloraError(f"caption template {rule!r} uses {', '.join(sorted(fields - {'folder', 'stem'}))}",
                           "use only {folder} and {stem}, or folder or filename")


def fallback_caption(rule: str, image: Path, folder_name: str) -> str:
    """The caption `rule` (folder, filename or a template) gives an image that has none."""
    if rule == "folder":
        return folder_name
    if rule == "filename":  # "my_cat-photo (2).jpg" -> "my cat photo"
        return re.sub(r"[_\-\s]+", " ", re.sub(r"\s*\(\d+\)$", "", image.stem)).strip()
    return rule.format(folder=folder_name, stem=image.stem).strip()


def add_prefix(caption: str, prefix: str | None) -> str:
    """Put a trigger word or prefix in front, unless the caption already starts with it (as a word)."""
    if not prefix or not caption:
        return caption or prefix or ""
    if re.match(re.escape(prefix) + r"(\W|$)", caption):
        return caption
    # Tag captions stay tags ("zorbly, red, circle"); a sentence gets the word in front ("zorbly a red ...").
    return f"{prefix}, {caption}" if "," in caption else f"{prefix} {caption}"


def sidecar(image: Path, caption_extensions=CAPTION_EXTENSIONS) -> Path | None:
    """The caption file of an image, in the order of `caption_extensions`."""
    for ext in caption_extensions:
        side = image.with_suffix(ext)
        if side.is_file():
            return side
    return None


def collect_items(root, caption_extensions=CAPTION_EXTENSIONS, fallback: str | None = None,
                  prefix: str | None = None, log: Callable[[str], None] | None = print_note,
                  contained: bool = False) -> list[Item]:
    """Every image under `root` with its caption and repeats, in a fixed (sorted) order. `log` gets
    folder_notes (repeat folders and skipped folders); None: silent. contained: as in walk()."""
    root = Path(root)
    check_fallback(fallback)
    found = walk(root, contained)
    for note in folder_notes(root, found) if log else []:
        log(note)
    jsonl = metadata_captions(found.metadata)
    items = []
    for image in found.images:
        name, repeats = concept(image.parent, root)
        caption, problem = None, None
        side = sidecar(image, caption_extensions)
        if side is not None:
            try:
                caption = read_caption(side)
            except ImgloraError as e:
                problem = e.what
        elif image in jsonl:
            caption = jsonl[image]
        if not caption and problem is None:
            if fallback:
                caption = fallback_caption(fallback, image, name) or None
            if not caption:
                problem = "empty caption" if side is not None or image in jsonl else "missing caption"
                caption = None
        if caption:
            caption = add_prefix(caption, prefix)
        items.append(Item(image, caption, repeats, problem))
    return items

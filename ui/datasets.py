"""The datasets folder of the Train tab: its dataset folders by name, their images and captions, caption edits.

Requests name a dataset, and an image by its path inside the dataset as listed; both are looked up in a
fresh listing, never joined onto a path, so `..`, `/etc`, a NUL byte or a symlink that leads out of the
root match nothing and no file is opened for them (as catalogue.py does for adapters). Caption edits go
through `imglora-data caption`'s own writer: the old file is copied to DATASET/.imglora-backup/TIME/ first
and the new text written atomically.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from datasets_tools.caption import apply as apply_captions
from datasets_tools.check import check_folder
from datasets_tools.stats import folder_stats, render
from datasets_tools.synth import synth
from imglora.data.captions import metadata_captions, read_caption, sidecar, walk
from imglora.data.images import opened
from imglora.errors import ImgloraError, escaped

THUMBS = 200  # thumbnails shown per dataset: the grid is for looking and editing, not a file manager
MAX_CAPTION = 2000  # characters; CLIP reads 77 tokens, so anything near this is a paste gone wrong
# The demo's own dataset (imglora demo): a shape the embedded model never saw, under a made-up word, and
# renders of the shapes it knows, for prior preservation.
DEMO = {"demo-zorbly": dict(n=60, seed=0, shapes=("heart",), words=["heart=zorbly"]),
        "demo-shapes": dict(n=60, seed=1)}


@dataclass
class Picture:
    rel: str  # its path inside the dataset, as requests name it
    image: Path
    caption_file: Path | None  # the sidecar, if any
    caption: str | None
    editable: str | None = None  # None: it can be edited; else why not


def _inside(path: Path, root: Path) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(root)


def _named(name, what: str) -> str:
    if not isinstance(name, str) or not name or not name.isprintable() or len(name) > 200:
        raise ImgloraError(f"{escaped(repr(name)[:60])} is not a {what} of this folder",
                           f"choose a {what} from the list")
    return name


class Datasets:
    def __init__(self, root):
        self.root = Path(root).expanduser().resolve()

    def names(self) -> list[str]:
        """The dataset folders: the visible folders right below the root (a link to a folder elsewhere is left out)."""
        if not self.root.is_dir():
            return []
        return sorted(e.name for e in os.scandir(self.root) if not e.name.startswith(".") and e.name.isprintable()
                      and e.is_dir() and _inside(Path(e.path), self.root))

    def path(self, name) -> Path:
        """The folder of a listed dataset; anything else is an error, and nothing is opened for it."""
        if _named(name, "dataset") not in self.names():
            raise ImgloraError(f"no dataset named {escaped(name)!r} in the datasets folder",
                               "choose one from the list, or put its folder in the datasets folder")
        return Path(os.path.realpath(self.root / name))  # a link to a folder inside the root: where it points

    def pictures(self, name) -> list[Picture]:
        """Every image of the dataset with its caption, as the trainer finds them; images that are links out
        of the dataset are left out (their files are not ours to show)."""
        root = self.path(name)
        found = walk(root, contained=True)
        jsonl = metadata_captions([m for m in found.metadata if _inside(m, root)])
        out = []
        for image in found.images:
            if not _inside(image, root):
                continue
            side = sidecar(image)
            pic = Picture(image.relative_to(root).as_posix(), image, side, None)
            if side is not None and (side.is_symlink() or not _inside(side, root)):
                pic.editable = "its caption file is a link; edit the file it points to"
            elif side is not None:
                try:
                    pic.caption = read_caption(side)
                except ImgloraError as e:
                    pic.editable = e.what
            elif image in jsonl:
                pic.caption = jsonl[image]
                pic.editable = ("captioned in metadata.jsonl; `imglora-data convert --to sidecar` first to edit "
                                "captions here")
            out.append(pic)
        return out

    def picture(self, name, rel) -> Picture:
        _named(rel, "image")
        for pic in self.pictures(name):
            if pic.rel == rel:
                return pic
        raise ImgloraError(f"no image {escaped(rel)!r} in dataset {name!r}", "choose an image from the grid")

    def save_caption(self, name, rel, text) -> str:
        """Write one caption (backed up first, then atomically); returns what was done."""
        pic = self.picture(name, rel)
        if pic.editable:
            raise ImgloraError(f"{pic.rel}: {pic.editable}")
        new = " ".join(str(text or "").split())  # one line: the trainer reads the whole file as one caption
        if not new:
            raise ImgloraError("the caption is empty", "write a caption (an empty one trains as no caption)")
        if len(new) > MAX_CAPTION or not new.isprintable():
            raise ImgloraError(f"the caption is not usable text ({len(new)} characters)",
                               f"write at most {MAX_CAPTION} printable characters")
        if new == pic.caption:
            return f"{pic.rel}: unchanged"
        root = self.path(name)
        side = pic.caption_file or pic.image.with_suffix(".txt")
        backup = apply_captions(root, [(side, pic.caption, new)])
        return f"saved {side.relative_to(root).as_posix()} (undo: imglora-data caption DATASET --restore " \
               f"{backup.relative_to(root).as_posix()})"

    def thumbnails(self, name, side: int = 128) -> tuple[list[tuple[Image.Image, str]], list[str], int]:
        """([(thumbnail, caption)], their image names, how many images the dataset has), the first THUMBS."""
        pictures = self.pictures(name)
        items, rels = [], []
        for pic in pictures[:THUMBS]:
            try:
                with opened(pic.image) as img:  # the trainer's own checks: bombs and non-images are refused
                    img.draft("RGB", (side, side))
                    thumb = img.convert("RGB")
                thumb.thumbnail((side, side))
            except (ImgloraError, OSError, ValueError):
                continue  # the dataset check lists it, with the reason
            items.append((thumb, pic.caption if pic.caption is not None else "(no caption)"))
            rels.append(pic.rel)
        return items, rels, len(pictures)

    def report(self, name, resolution: int) -> tuple[str, str]:
        """(the dataset check's findings, the bucket statistics) as text, paths relative to the dataset."""
        root = self.path(name)
        rep = check_folder(root, progress=False, resolution=resolution)
        prefix = str(root) + os.sep

        def rel(text: str) -> str:  # each line stays a line; what a file name holds is escaped
            return "\n".join(escaped(line) for line in text.replace(prefix, "").splitlines())
        lines = [f"{rep.images} images; " + (f"{len(rep.findings)} findings:" if rep.findings else "no problems found")]
        lines += [f"[{f.severity}] {rel(f.path)}: {rel(f.reason)} — {rel(f.fix)}" for f in rep.findings]
        lines += [rel(n) for n in rep.notes]
        try:
            stats = rel(render(folder_stats(root, resolution=resolution, progress=False)))
        except ImgloraError as e:
            stats = rel(e.what)
        return "\n".join(lines), stats

    def make_demo(self) -> list[str]:
        """The demo datasets (what `imglora demo` trains on), made into the datasets folder; returns the new ones."""
        made = []
        for name, spec in DEMO.items():
            if (self.root / name).exists():
                continue
            self.root.mkdir(parents=True, exist_ok=True)
            synth(self.root / name, spec["n"], spec["seed"], 64, spec.get("shapes"), words=spec.get("words", []))
            made.append(name)
        return made


def captioner_names(folder) -> list[str]:
    """The captioner model folders in `folder` (each a folder autocaption.load_captioner reads)."""
    if folder is None or not Path(folder).is_dir():
        return []
    root = Path(folder).resolve()
    return sorted(e.name for e in os.scandir(root) if not e.name.startswith(".") and e.is_dir()
                  and _inside(Path(e.path), root))


def autocaption_module():
    """datasets_tools.autocaption (`imglora-data caption --model`), or None where it is not installed."""
    try:
        from datasets_tools import autocaption
    except ImportError:
        return None
    return autocaption


# The captioner last used stays loaded (loading one takes longer than captioning a small folder); only one,
# as captioners run to gigabytes. Keyed by folder and its modification time, so a replaced model is reloaded.
_LOADED: dict[tuple[str, int], object] = {}
_LOADING = threading.Lock()


def loaded_captioner(module, path: Path):
    with _LOADING:
        key = (str(path), path.stat().st_mtime_ns)
        if key not in _LOADED:
            _LOADED.clear()  # the old one is freed before the new one loads
            _LOADED[key] = module.load_captioner(path)
        return _LOADED[key]


def autocaption(datasets: Datasets, name, captioners, captioner, existing: str = "skip") -> str:
    """Caption the dataset with a model folder from the captioners folder, as `imglora-data caption --model`
    does (existing: skip captioned images, overwrite or append; originals backed up, writes atomic)."""
    module = autocaption_module()
    if module is None:
        raise ImgloraError("auto-captioning is not installed (datasets_tools/autocaption.py)", "")
    if existing not in module.EXISTING:
        raise ImgloraError(f"{escaped(existing)!r} is not one of {', '.join(module.EXISTING)}")
    if _named(captioner, "captioner") not in captioner_names(captioners):
        raise ImgloraError(f"no captioner named {escaped(captioner)!r} in the captioners folder",
                           "choose one from the list")
    root = datasets.path(name)
    folder = Path(captioners).resolve() / captioner
    # Nothing to caption: the model is not loaded (caption_folder checks the folder without loading it).
    model = loaded_captioner(module, folder) if module.plan_folder(root, existing)[0] else folder
    result = module.caption_folder(root, model, existing=existing, progress=False)
    return escaped(module.summary(root, result, existing, False).replace(str(root), name))

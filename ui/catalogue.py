"""The adapters folder: every `.safetensors` in it, listed by name, with its status.

Requests name an adapter; they never carry a path. A name is looked up in the last listing of the
folder (A1111's rule: `<lora:name:w>` is a name lookup, RELIABILITY.md §3), so `../x`, `/etc/passwd`,
`C:\\x` or `x::$DATA` match nothing and no file is opened for them. Listing reads only headers (and
alpha scalars): the architecture, and every module's shape against the loaded model. The full,
strict load (NaN check) happens when an adapter is first used, and its failure is recorded here, so
one bad file is listed with its reason and the others keep working.

A name is a label for one file version: a blend records the `version` it was enabled with, and if a
rescan makes the name point to another file (replaced, renamed onto it, or a name shifted to another
file of the same stem), the blend is refused with a message instead of silently using the other file.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from imglora.errors import ImgloraError
from imglora.formats.files import read_header
from imglora.formats.inspect import describe
from imglora.formats.detect import ARCH_NAMES, arch_from_header, arch_mismatch
from imglora.lora.adapters import NAME_RE
from imglora.pipeline import adapter_name

SUFFIX = ".safetensors"


@dataclass
class Entry:
    name: str
    path: Path
    fingerprint: tuple  # (device, inode, size, mtime_ns): a replaced or rewritten file differs
    arch: str = "unknown"
    error: str | None = None  # why it cannot be used (broken, foreign, outside the folder)
    info: dict | None = field(default=None, repr=False)  # describe(), after the full load
    keywords: str = ""  # file name, trigger words and tags from the header, lower case, for the search box

    @property
    def usable(self) -> bool:
        return self.error is None

    @property
    def version(self) -> tuple:
        """Which file, in which state, this name meant when it was listed."""
        return (str(self.path), *self.fingerprint)

    def row(self) -> list[str]:
        """[name, status, base model, file, keywords]: the status first, as it is what a user looks for."""
        arch = "unknown" if self.arch == "unknown" else ARCH_NAMES.get(self.arch, self.arch)
        return [self.name, "ok" if self.usable else self.error, arch, self.path.name, self.keywords]


def fingerprint(path: Path) -> tuple:
    try:
        st = path.stat()  # through a link: replacing its target changes the version too
    except OSError:
        st = path.lstat()  # a dangling link is still listed, with its reason
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _keywords(path: Path, metadata: dict) -> str:
    """What the search box matches besides the name: the file name, trigger words and training tags."""
    words = [path.name] + [metadata.get(k, "") for k in ("modelspec.trigger_phrase", "ss_trigger_words",
                                                         "ss_output_name", "modelspec.title")]
    try:
        freq = json.loads(metadata.get("ss_tag_frequency", "{}"))
        words += [str(tag) for tags in freq.values() if isinstance(tags, dict) for tag in tags]
    except (ValueError, AttributeError):
        pass
    return " ".join(words).lower()[:4000]


class Replaced(ImgloraError):
    """A name that now points to another file than the one a blend enabled."""


def check_name(name) -> str:
    """A syntactically valid adapter name, or an error; never touches the file system."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        shown = repr(name)[:60]
        raise ImgloraError(f"{shown} is not an adapter name",
                           "use a name from the adapters list (letters, digits, '_' and '-'; no paths)")
    return name


class Catalogue:
    """The adapters folder, listed by name. Thread-safe: a scan swaps in a new dict."""

    def __init__(self, folder: str | os.PathLike, model_arch: str, misfit: Callable[[Path], str | None] | None = None):
        """misfit(path): why the file's modules do not fit the loaded model (None: they fit), from its
        header alone; so an adapter made for another model is listed with the reason, not as usable."""
        self.folder = Path(folder).expanduser().resolve()
        self.model_arch = model_arch
        self.misfit = misfit
        self.entries: dict[str, Entry] = {}
        self._lock = threading.Lock()

    def scan(self) -> list[Entry]:
        """List the folder again; keeps what is known about unchanged files."""
        old = self.entries
        found: dict[str, Entry] = {}
        for path in self._files():
            try:
                stamp = fingerprint(path)
            except OSError:
                continue
            name = adapter_name(path, list(found))
            prev = old.get(name)
            if prev is not None and prev.path == path and prev.fingerprint == stamp:
                found[name] = prev
                continue
            found[name] = self._examine(name, path, stamp)
        with self._lock:
            self.entries = found
        return list(found.values())

    def _files(self) -> list[Path]:
        files = []
        if not self.folder.is_dir():
            return files
        for root, dirs, names in os.walk(self.folder, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files += [Path(root) / n for n in sorted(names) if n.endswith(SUFFIX) and not n.startswith(".")]
        return files

    def _examine(self, name: str, path: Path, stamp: tuple) -> Entry:
        entry = Entry(name, path, stamp, keywords=path.name.lower())
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(self.folder) or not real.is_file():
            # An escaping symlink is listed but never opened (RELIABILITY.md U2).
            entry.error = "links outside the adapters folder; not read"
            return entry
        try:
            header, metadata, _ = read_header(path)
        except ImgloraError as e:
            entry.error = _reason(e)
            return entry
        entry.keywords = _keywords(path, metadata)
        entry.arch = arch_from_header({k: tuple(v.get("shape", ())) for k, v in header.items()}, metadata)
        self._check_arch(entry)
        if entry.error is None and self.misfit is not None:
            try:
                why = self.misfit(path)
            except ImgloraError as e:
                why = _reason(e)
            if why:
                entry.error = f"does not fit this model: {why}"
        return entry

    def _check_arch(self, entry: Entry) -> None:
        why = arch_mismatch(entry.arch, self.model_arch)
        if entry.error is None and why:
            entry.error = f"incompatible: {why}"

    def get(self, name, version: tuple | None = None) -> Entry:
        """The usable entry called `name`, or an error a user can act on. Opens no file.

        version: the `Entry.version` the caller enabled; a name that now means another file is refused."""
        entry = self.entries.get(check_name(name))
        if entry is None:
            raise ImgloraError(f"no adapter named {name!r} in the adapters folder",
                               "press Refresh, or put the .safetensors file in the adapters folder")
        if entry.error:
            raise ImgloraError(f"adapter {name!r} cannot be used: {entry.error}", "", path=entry.path.name)
        if version is not None and tuple(version) != entry.version:
            raise Replaced(f"adapter {name!r} is not the file you enabled: {entry.path.name} was replaced, or "
                           "another file took the name, since", "enable it again to use the file now in the folder")
        return entry

    def card(self, name) -> dict:
        """describe() of a usable adapter (the full, strict load), cached until the file changes."""
        entry = self.get(name)
        if entry.info is None:
            try:
                entry.info = describe(entry.path)
            except ImgloraError as e:
                self.mark_broken(entry, e)
                raise ImgloraError(f"adapter {name!r} cannot be used: {entry.error}", "",
                                   path=entry.path.name) from None
            entry.arch = entry.info["base_model"]
            self._check_arch(entry)
            if entry.error:
                raise ImgloraError(f"adapter {name!r} cannot be used: {entry.error}", "", path=entry.path.name)
        return entry.info

    def mark_broken(self, entry: Entry, error: Exception) -> None:
        entry.error = _reason(error)

    def names(self, usable_only: bool = True) -> list[str]:
        return [n for n, e in self.entries.items() if e.usable or not usable_only]


def _reason(e: Exception) -> str:
    """The error without the temp/absolute path in front (the file name is shown beside it)."""
    if isinstance(e, ImgloraError):
        return f"{e.what} — {e.fix}" if e.fix else e.what
    return str(e)

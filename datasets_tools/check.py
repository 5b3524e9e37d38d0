"""`imglora-data check DIR`: every problem of a training folder, per file, with the reason and the fix.

One parallel pass opens each image once: header, a reduced-size decode (catches truncation, and
gives the perceptual hash), the content hash. Nothing under DIR is written.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from imglora.data.captions import REPEAT_DIR, _jsonl_captions, read_caption
from imglora.data.images import IMAGE_EXTENSIONS, _open, _to_8bit, probe_image
from imglora.data.scan import check_decodes
from imglora.errors import ImgloraError

CAPTION_EXTENSIONS = (".txt", ".caption")
ODD_MODES = {"CMYK": "CMYK colours", "LA": "grey with alpha", "1": "1-bit", "I;16": "16-bit", "I;16B": "16-bit",
             "I;16L": "16-bit", "I": "32-bit integer", "F": "32-bit float", "RGBA": "transparency", "PA": "palette "
             "with transparency"}
CONVERT_FIX = "imglora converts it when loading; `imglora-data resize` writes a plain RGB copy"


@dataclass
class Finding:
    path: str
    reason: str
    fix: str
    kind: str  # image, caption, duplicate, folder


def _file_entry(path: Path, min_side: int, max_aspect: float) -> dict:
    """Everything about one image file: problems, content hash, perceptual hash."""
    out: dict = {"path": path, "problems": [], "sha": None, "dhash": None, "size": None}
    try:
        data = path.read_bytes()
    except OSError as e:
        out["problems"].append((f"unreadable ({e.strerror})", "check its permissions"))
        return out
    out["sha"] = hashlib.sha256(data).hexdigest()
    try:
        info = probe_image(path)
        check_decodes(path, info)
    except ImgloraError as e:
        out["problems"].append((e.what, e.fix or "remove it or copy it again"))
        return out
    out["size"] = info.size
    w, h = info.size
    if info.n_frames > 1:
        out["problems"].append((f"animated ({info.n_frames} frames)", "only the first frame is used; save it as PNG"))
    mode = info.mode
    with _open(path) as img:
        if mode == "P" and "transparency" in img.info:
            mode = "PA"
        out["dhash"] = _dhash(img)
    if mode in ODD_MODES and mode != "RGBA":
        out["problems"].append((f"{ODD_MODES[mode]} image (mode {info.mode})", CONVERT_FIX))
    if info.exif_transposed:
        out["problems"].append(("EXIF rotation (trains as it displays)", "`imglora-data resize` writes it upright"))
    if min(w, h) < min_side:
        out["problems"].append((f"too small ({w}x{h}, under {min_side} px)", "remove it or use a larger version"))
    if max(w, h) / max(1, min(w, h)) > max_aspect:
        out["problems"].append((f"extreme aspect ratio ({w}x{h})", "crop it closer to the subject"))
    return out


def _dhash(img: Image.Image) -> tuple[int, tuple[int, int, int]]:
    """A 64-bit difference hash (near-identical images, resized or re-encoded, differ in few bits) and
    the mean colour (the hash alone cannot tell two flat images of different colours apart)."""
    if img.format == "JPEG":
        img.draft("RGB", (64, 64))
    if img.mode.startswith(("I", "F")):
        img = _to_8bit(img)
    rgb = img.convert("RGB")
    small = np.asarray(rgb.convert("L").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int(np.packbits(bits).view(">u8")[0]), rgb.resize((1, 1), Image.Resampling.BOX).getpixel((0, 0))


def _walk(root: Path, findings: list[Finding]):
    """Images and caption files under root; symlink loops and unreadable folders become findings."""
    images, captions = [], []
    seen_dirs = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=lambda e: findings.append(
            Finding(str(e.filename), f"unreadable folder ({e.strerror})", "check its permissions", "folder"))):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            findings.append(Finding(dirpath, "symlink loop (folder already visited)", "remove the link", "folder"))
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if name.startswith("."):
                continue
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                images.append(p)
            elif p.suffix.lower() in CAPTION_EXTENSIONS:
                captions.append(p)
    return images, captions


def count_tokens(text: str, tokenizer=None) -> tuple[int, bool]:
    """CLIP tokens including start and end; (count, exact). Without a tokenizer, CLIP's pre-tokenizer
    split gives a lower bound (every piece is at least one token)."""
    if tokenizer is not None:
        return len(tokenizer(text, truncation=False).input_ids), True
    import regex

    pieces = regex.findall(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", text.lower())
    return len(pieces) + 2, False


def load_tokenizer(path: str | None):
    if not path:
        return None
    from imglora.models.tiny import load_clip_tokenizer

    folder = Path(path)
    if (folder / "tokenizer").is_dir():
        folder = folder / "tokenizer"
    try:
        return load_clip_tokenizer(folder)
    except Exception as e:  # transformers raises several kinds for a wrong folder
        raise ImgloraError(f"not a CLIP tokenizer folder ({str(e).splitlines()[0][:120]})",
                           "pass a tokenizer folder or a diffusers model folder", path=path) from None


def check_folder(root, min_side: int = 64, max_aspect: float = 4.0, max_tokens: int = 77, tokenizer=None,
                 near_bits: int = 3, workers: int | None = None, progress: bool = True) -> list[Finding]:
    root = Path(root)
    if not root.is_dir():
        raise ImgloraError("no such folder", "pass the folder of training images", path=root)
    findings: list[Finding] = []
    images, caption_files = _walk(root, findings)
    workers = workers or min(16, (os.cpu_count() or 2) * 4)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        entries = list(tqdm(pool.map(lambda p: _file_entry(p, min_side, max_aspect), images), total=len(images),
                            desc="checking", unit="img", disable=not progress or len(images) < 200))
    for e in entries:
        findings += [Finding(str(e["path"]), reason, fix, "image") for reason, fix in e["problems"]]
    findings += _caption_findings(images, caption_files, max_tokens, tokenizer)
    findings += _duplicate_findings([e for e in entries if e["sha"]], near_bits)
    return findings


def _caption_findings(images: list[Path], caption_files: list[Path], max_tokens: int, tokenizer) -> list[Finding]:
    out = []
    jsonl: dict[Path, dict[str, str]] = {}
    stems = {p.with_suffix("") for p in images}
    for cap in caption_files:
        if cap.with_suffix("") not in stems:
            out.append(Finding(str(cap), "caption without an image", "remove it or add its image", "caption"))
    for image in images:
        folder = image.parent
        if folder not in jsonl:
            try:
                jsonl[folder] = _jsonl_captions(folder)
            except ImgloraError as e:
                out.append(Finding(str(e.path), e.what, e.fix, "caption"))
                jsonl[folder] = {}
        side = next((image.with_suffix(ext) for ext in CAPTION_EXTENSIONS if image.with_suffix(ext).is_file()), None)
        if side is None:
            if image.name in jsonl[folder]:
                text = jsonl[folder][image.name].strip()
                where = str(folder / "metadata.jsonl")
            elif REPEAT_DIR.match(folder.name):
                continue  # kohya folders may caption by folder name (--caption-fallback folder)
            else:
                out.append(Finding(str(image), "missing caption", "add a .txt file beside it, or use "
                                   "`imglora-data caption --create-missing`", "caption"))
                continue
        else:
            where = str(side)
            try:
                text = read_caption(side)
            except ImgloraError as e:
                out.append(Finding(str(side), e.what, e.fix, "caption"))
                continue
        if not text:
            out.append(Finding(where if side else str(image), "empty caption", "write a caption", "caption"))
            continue
        n, exact = count_tokens(text, tokenizer)
        if n > max_tokens:
            out.append(Finding(where, f"caption too long ({'' if exact else 'at least '}{n} CLIP tokens, "
                                      f"{max_tokens} are read)", "shorten it; the rest is cut off", "caption"))
    return out


def _duplicate_findings(entries: list[dict], near_bits: int) -> list[Finding]:
    """Exact duplicates by content hash; near duplicates by perceptual hash among distinct contents."""
    out = []
    first: dict[str, Path] = {}
    unique = []
    for e in entries:
        if e["sha"] in first:
            out.append(Finding(str(e["path"]), f"exact duplicate of {first[e['sha']]}", "remove one copy",
                               "duplicate"))
        else:
            first[e["sha"]] = e["path"]
            if e["dhash"] is not None:
                unique.append(e)
    if len(unique) > 1:
        hashes = np.array([e["dhash"][0] for e in unique], dtype=np.uint64)
        colours = np.array([e["dhash"][1] for e in unique], dtype=np.int16)
        reported = set()
        for i in range(len(unique) - 1):
            dist = np.bitwise_count(hashes[i + 1:] ^ hashes[i])
            close = np.abs(colours[i + 1:] - colours[i]).max(axis=1) <= 16
            for j in np.nonzero((dist <= near_bits) & close)[0]:
                k = i + 1 + int(j)
                if k not in reported:
                    reported.add(k)
                    out.append(Finding(str(unique[k]["path"]), f"near duplicate of {unique[i]['path']}",
                                       "remove one unless they differ on purpose", "duplicate"))
    return out


def as_dicts(findings: list[Finding]) -> list[dict]:
    return [asdict(f) for f in findings]

"""`imglora-data check DIR`: every problem of a training folder, per file, with the reason and the fix.

One parallel pass reads each image file once: content hash of the bytes, then the trainer's own
inspection (header, EXIF, the decode check) on those bytes, plus a 9x8 perceptual hash. Captions are
found by the trainer's own rules (imglora/data/captions.py). Nothing under DIR is written.

Severity: "error" = training cannot use the file as it is (the trainer skips it, or stops past
--max-bad); "warning" = it trains, but probably not as intended.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from imglora.data import MIN_IMAGE_SIDE
from imglora.data.buckets import bucketer
from imglora.data.captions import (CAPTION_EXTENSIONS, Walk, add_prefix, check_fallback, folder_notes, read_caption,
                                   read_metadata, repeat_folder, sidecar, walk)
from imglora.data.images import EXTENSION_FORMATS, ImageInfo, has_alpha, open_file, orientation, to_rgb
from imglora.data.scan import inspect_image, parallel_map
from imglora.errors import ImgloraError, shown
from imglora.train.masks import find_mask, fits, inside, mask_index, read_mask

ODD_MODES = {"CMYK": "CMYK", "LA": "grey with alpha", "La": "grey with alpha", "PA": "palette with alpha",
             "1": "1-bit", "I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit", "I": "32-bit integer",
             "F": "32-bit float", "YCbCr": "YCbCr", "RGBa": "premultiplied alpha"}
CONVERT_FIX = "imglora converts it when loading; `imglora-data resize` writes a plain RGB copy"
# Image types people have that imglora does not open: found files of these kinds are reported, not skipped silently.
OTHER_IMAGE_TYPES = {".tif", ".tiff", ".heic", ".heif", ".avif", ".psd", ".jp2", ".jxl", ".svg", ".ico", ".tga",
                     ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".exr", ".hdr", ".ppm", ".pgm", ".pbm", ".qoi"}
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


@dataclass
class Finding:
    path: str
    reason: str
    fix: str
    kind: str  # image, mask, caption, duplicate, folder
    severity: str = "warning"  # error: training cannot use it; warning: it trains, probably not as meant


@dataclass
class Report:
    folder: str
    images: int
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was decided: repeat folders, skipped folders

    def as_dict(self) -> dict:
        errors = sum(f.severity == "error" for f in self.findings)
        return {"folder": self.folder, "images": self.images, "errors": errors,
                "warnings": len(self.findings) - errors, "problems": [asdict(f) for f in self.findings],
                "notes": self.notes}


@dataclass
class Pixels:
    """What the decoded image tells beyond its header."""
    dhash: int  # 64-bit difference hash (Krawetz's dHash): survives resizing and re-encoding
    thumb: np.ndarray  # (8, 8, 3) uint8 colours: dHash alone calls any two mostly flat images alike
    aspect: float  # log(w / h): both hashes squash the image to a square
    transparent: bool  # any pixel with alpha below 255
    palette_alpha: bool  # a palette (or grey/RGB) image with a transparent colour entry


def measure(img: Image.Image, info: ImageInfo) -> Pixels:
    """Perceptual hash and transparency of a decoded image (JPEG arrives draft-reduced)."""
    transparent = img.mode in ("RGBA", "LA", "PA", "La", "RGBa") and img.getchannel("A").getextrema()[0] < 255
    small = img if img.mode in ("RGB", "RGBA", "L", "LA", "CMYK") else to_rgb(img)
    small = to_rgb(small.resize((32, 32), Image.Resampling.BOX, reducing_gap=2.0))
    turn = orientation(img)
    if turn in _TRANSPOSE:  # hash what trains, so a rotated copy of a picture still matches
        small = small.transpose(_TRANSPOSE[turn])
    grey = np.asarray(small.convert("L").resize((9, 8), Image.Resampling.BOX), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).flatten()
    thumb = np.asarray(small.resize((8, 8), Image.Resampling.BOX), dtype=np.uint8)
    return Pixels(int(np.packbits(bits).view(">u8")[0]), thumb, math.log(info.size[0] / info.size[1]), transparent,
                  img.mode in ("P", "L", "RGB") and has_alpha(img))


MAX_UPSCALE = 2.0  # an image enlarged more than this per side to fill its bucket trains visibly blurred


def inspect_file(path: Path, min_side: int, max_aspect: float, bucket_of=None, resolution: int | None = None) -> dict:
    """Everything about one image file: its problems, content hash and Pixels. `bucket_of`: the trainer's
    bucket rule at `resolution` (data.buckets.bucketer), to find images that would train much enlarged."""
    out: dict = {"path": path, "problems": [], "sha": None, "pixels": None, "size": None}
    try:
        with open_file(path) as f:
            data = f.read()
        out["sha"] = hashlib.sha256(data).hexdigest()
        info, pixels = inspect_image(path, data, measure)
    except ImgloraError as e:
        out["problems"].append((e.what, e.fix or "remove it or copy it again", "error"))
        return out
    out["pixels"], out["size"] = pixels, info.size
    w, h = info.size
    expected = EXTENSION_FORMATS[path.suffix.lower()]
    if info.format != expected and not (info.format == "MPO" and expected == "JPEG"):
        ext = {"JPEG": ".jpg", "MPO": ".jpg"}.get(info.format, "." + info.format.lower())
        out["problems"].append((f"{info.format} data in a {path.suffix} file", f"rename it to {ext}", "warning"))
    if info.format == "MPO":
        out["problems"].append((f"multi-picture JPEG ({info.n_frames} images)", "the first is used; re-save it "
                                "as a plain JPEG to be sure", "warning"))
    elif info.n_frames > 1:
        out["problems"].append((f"animated ({info.n_frames} frames)", "only the first frame is used; save that "
                                "frame as PNG", "warning"))
    if info.mode in ODD_MODES:
        out["problems"].append((f"{ODD_MODES[info.mode]} image (mode {info.mode})", CONVERT_FIX, "warning"))
    elif pixels.palette_alpha:
        kind = "palette" if info.mode == "P" else f"{info.mode} with a transparent colour"
        out["problems"].append((f"{kind} with transparency", "transparent pixels train as the background "
                                "colour (white); " + CONVERT_FIX, "warning"))
    elif pixels.transparent:
        out["problems"].append(("transparent pixels", "they train as the background colour (white); "
                                "`imglora-data resize --background` flattens onto another", "warning"))
    if info.exif_transposed:
        out["problems"].append(("EXIF rotation (trains as it displays)", "nothing to do; `imglora-data resize` "
                                "writes it upright for other tools", "warning"))
    if min(w, h) < min_side:
        out["problems"].append((f"too small ({w}x{h}, under {min_side} px)", "remove it or use a larger version",
                                "error"))
    elif max(w, h) / min(w, h) > max_aspect:
        out["problems"].append((f"extreme aspect ratio ({w}x{h}, over {max_aspect:g}:1)",
                                "crop it closer to the subject", "warning"))
    elif bucket_of is not None:
        bw, bh = bucket_of(w, h)
        scale = max(bw / w, bh / h)
        if scale > MAX_UPSCALE:
            out["problems"].append((f"trains enlarged {scale:.1f}x ({w}x{h} into the {bw}x{bh} bucket at "
                                    f"{resolution} px): blurry", "use a larger version, or train with --no-upscale",
                                    "warning"))
    return out


# -- captions ---------------------------------------------------------------------------------------
def count_tokens(text: str, tokenizer=None) -> tuple[int, bool]:
    """CLIP tokens including start and end: (count, exact). Without a tokenizer, CLIP's own
    pre-tokenizer split (openai/CLIP simple_tokenizer.py) counts pieces: a lower bound, since BPE
    gives every piece at least one token."""
    if tokenizer is not None:
        return len(tokenizer(text, truncation=False).input_ids), True
    import regex

    pieces = regex.findall(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", text.lower())
    return len(pieces) + 2, False


def load_tokenizer(path: str | None):
    """A CLIP tokenizer from a tokenizer folder or a diffusers model folder (None: estimate)."""
    if not path:
        return None
    folder = Path(path)
    if (folder / "tokenizer").is_dir():
        folder = folder / "tokenizer"
    if not folder.is_dir():
        raise ImgloraError("no such folder", "pass a CLIP tokenizer folder or a diffusers model folder", path=path)
    if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        raise ImgloraError("not a CLIP tokenizer folder (no vocab.json and merges.txt)",
                           "pass a tokenizer folder or a diffusers model folder (with tokenizer/)", path=path)
    from transformers import CLIPTokenizer

    try:
        tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises several kinds for a wrong folder
        raise ImgloraError(f"not a CLIP tokenizer folder ({str(e).splitlines()[0][:120]})",
                           "pass a tokenizer folder or a diffusers model folder", path=path) from None
    tok.model_max_length = 10**9  # count past 77 without transformers' "sequence too long" warning
    return tok


def caption_findings(found: Walk, root: Path, max_tokens: int, tokenizer=None, fallback: str | None = None,
                     trigger: str | None = None, extensions=CAPTION_EXTENSIONS) -> list[Finding]:
    """Missing, empty, non-UTF-8 and over-long captions, captions without an image, bad metadata.jsonl."""
    out: list[Finding] = []
    images = set(found.images)
    jsonl: dict[Path, str] = {}
    for meta in sorted(found.metadata, key=lambda p: len(p.parts)):  # deeper files win, as in collect_items
        try:
            rows = read_metadata(meta)
        except ImgloraError as e:
            out.append(Finding(str(meta), e.what, e.fix, "caption", "error"))
            continue
        jsonl.update(rows)
        for image in sorted(set(rows) - images):
            out.append(Finding(str(image), f"caption without an image (a row of {meta.name})",
                               f"remove the row from {meta} or add the image", "caption"))
    stems = {p.with_suffix("") for p in found.images}
    for other in found.others:
        suffix = other.suffix.lower()
        if suffix in extensions and other.with_suffix("") not in stems:
            out.append(Finding(str(other), "caption without an image", "remove it or add its image", "caption"))
        elif suffix in OTHER_IMAGE_TYPES:
            out.append(Finding(str(other), f"not a supported image type ({suffix}); the trainer ignores it",
                               "convert it to PNG or JPEG", "image"))
    hint = "add a .txt caption beside it (`imglora-data caption --create-missing filename|folder|TEMPLATE`)"
    for image in found.images:
        side = sidecar(image, extensions)
        if side is not None:
            where = side
            try:
                text = read_caption(side)
            except ImgloraError as e:
                out.append(Finding(str(side), e.what, e.fix, "caption", "error"))
                continue
            if image in jsonl and jsonl[image] != text:
                out.append(Finding(str(side), f"caption differs from its row in metadata.jsonl ({side.name} is used)",
                                   "remove one of the two", "caption"))
        elif image in jsonl:
            where, text = image, jsonl[image]
        else:
            where, text = image, None
        if text is None and not fallback:
            kohya = any(repeat_folder(part)[0] for part in image.parent.relative_to(root.parent).parts)
            fix = hint + (", or train with --caption-fallback folder (kohya style)" if kohya else "")
            out.append(Finding(str(image), "missing caption", fix, "caption", "error"))
            continue
        if not text and fallback:
            continue  # the trainer captions it by --caption-fallback
        if not text:
            out.append(Finding(str(where), "empty caption" + (" (in metadata.jsonl)" if where == image else ""),
                               "write a caption", "caption", "error"))
            continue
        n, exact = count_tokens(add_prefix(text, trigger), tokenizer)
        if n > max_tokens:
            count = f"{n} CLIP tokens" if exact else f"at least {n} CLIP tokens by estimate"
            out.append(Finding(str(where), f"caption too long ({count}; {max_tokens} are read)",
                               "shorten it; the rest is cut off" + ("" if exact else " (--tokenizer MODEL counts "
                                                                                  "exactly)"), "caption"))
    return out


# -- masks (--masked-loss --mask-dir) ---------------------------------------------------------------
def inspect_mask(mask: Path, image: Path | None, size, root: Path) -> list[Finding]:
    """A mask decoded whole: unreadable, not its image's shape, or all black (its image trains nothing)."""
    name = image.relative_to(root) if image else None
    try:
        weights = read_mask(mask)
    except ImgloraError as e:
        return [Finding(str(mask), f"unreadable mask{f' of {name}' if name else ''} ({e.what.removeprefix('mask: ')})",
                        e.fix or "re-save it or remove it", "mask", "error")]
    out = []
    if image is None:
        out.append(Finding(str(mask), "mask without an image", f"remove it, or add its image to {root} under the "
                           "same name", "mask"))
    elif size is not None and not fits(weights.size, size):
        (mw, mh), (w, h) = weights.size, size
        out.append(Finding(str(mask), f"mask {mw}x{mh} does not fit its image {name} ({w}x{h}, another aspect "
                           "ratio)", "re-save the mask at the image's size (a resize to the same aspect ratio "
                           "also works)", "mask", "error"))
    if image is not None and weights.getextrema()[1] <= 0:
        out.append(Finding(str(mask), f"all-black mask: {name} trains nothing with --masked-loss",
                           "paint what should train white, or remove the mask to train the whole image", "mask"))
    return out


def mask_findings(found: Walk, root: Path, mask_dir, sizes: dict, workers=None,
                  progress: bool = True) -> tuple[list[Finding], list[str]]:
    """Findings for every mask in `mask_dir` as the trainer pairs them with images, and a note counting the
    images without one (they train whole)."""
    mask_dir = Path(mask_dir)
    if not mask_dir.is_dir():
        raise ImgloraError("no such mask folder", "pass the folder of masks named as the images", path=mask_dir)
    index = mask_index(mask_dir)
    pairs = {}  # mask -> the first image it belongs to
    unmasked = 0
    for image in found.images:
        mask = find_mask(image, root, index)
        if mask is None:
            unmasked += 1
        else:
            pairs.setdefault(mask, image)
    masks = sorted({*index[0].values(), *index[1].values()})
    results = parallel_map(lambda m: inspect_mask(m, pairs.get(m), sizes.get(pairs.get(m)), root), masks,
                           workers, "checking masks", progress)
    notes = [f"{unmasked} of {len(found.images)} images have no mask in {shown(mask_dir)}; with --masked-loss "
             "they train on the whole image"] if unmasked else []
    return [f for r in results for f in r], notes


# -- duplicates -------------------------------------------------------------------------------------
NEAR_MEAN_LEVELS, NEAR_CELL_LEVELS, NEAR_CELLS = 6, 24, 3
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def hamming(a: np.ndarray, b: int) -> np.ndarray:
    """Bit differences between uint64 hashes `a` and one hash `b`."""
    x = a ^ np.uint64(b)
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    return _POPCOUNT[x.view(np.uint8)].reshape(-1, 8).sum(axis=1)


def duplicate_findings(entries: list[dict], near_bits: int) -> list[Finding]:
    """Exact duplicates by content hash; near duplicates by perceptual hash and 8x8 colours among the rest."""
    out = []
    first: dict[str, Path] = {}
    unique = []
    for e in entries:
        if e["sha"] in first:
            out.append(Finding(str(e["path"]), f"exact duplicate of {first[e['sha']]}", "remove one copy",
                               "duplicate"))
        else:
            first[e["sha"]] = e["path"]
            if e["pixels"] is not None:
                unique.append(e)
    if near_bits < 0 or len(unique) < 2:
        return out
    hashes = np.array([e["pixels"].dhash for e in unique], dtype=np.uint64)
    thumbs = np.stack([e["pixels"].thumb for e in unique]).astype(np.int16)
    aspects = np.array([e["pixels"].aspect for e in unique])
    reported = np.zeros(len(unique), dtype=bool)
    for i in range(len(unique) - 1):
        close = (hamming(hashes[i + 1:], int(hashes[i])) <= near_bits) & ~reported[i + 1:] & \
                (np.abs(aspects[i + 1:] - aspects[i]) <= 0.1)  # aspect ratios within ~10%
        candidates = np.nonzero(close)[0] + i + 1
        if not len(candidates):
            continue
        # The same picture: 8x8 colours within a few levels on average (a re-encode or resize moves
        # them by ~1, a 1% crop by ~4) and at most 3 cells far off (a watermark, a small edit); two
        # different pictures on similar backgrounds differ more (dHash sees little in flat areas).
        diff = np.abs(thumbs[candidates] - thumbs[i]).max(axis=3)
        same = (diff.mean(axis=(1, 2)) <= NEAR_MEAN_LEVELS) & ((diff > NEAR_CELL_LEVELS).sum(axis=(1, 2)) <= NEAR_CELLS)
        for j in candidates[same]:
            reported[j] = True
            out.append(Finding(str(unique[j]["path"]), f"near duplicate of {unique[i]['path']}",
                               "remove one unless they differ on purpose", "duplicate"))
    return out


def check_folder(root, min_side: int = MIN_IMAGE_SIDE, max_aspect: float = 4.0, max_tokens: int = 77,
                 tokenizer=None, near_bits: int = 6, workers: int | None = None, progress: bool = True,
                 fallback: str | None = None, trigger: str | None = None, caption_extensions=CAPTION_EXTENSIONS,
                 resolution: int | None = None,
                 bucket_step: int = 64, min_bucket: int | None = None, max_bucket: int | None = None,
                 no_upscale: bool = False, mask_dir=None) -> Report:
    """Every problem under `root`, image by image, then captions, then duplicates. With `resolution` (and
    the other bucket settings, as in training), images that would train much enlarged are reported too.
    With `mask_dir`, every mask as --masked-loss pairs it (a mask folder inside `root` holds no images)."""
    root = Path(root)
    check_fallback(fallback)
    bucket_of = bucketer(resolution, bucket_step, min_bucket, max_bucket) if resolution and not no_upscale else None
    found = walk(root)
    if mask_dir is not None:
        for files in (found.images, found.others, found.metadata):
            files[:] = [p for p in files if not inside(p, mask_dir)]
    findings = [Finding(str(p), why, "remove the link" if "link" in why else "check its permissions", "folder")
                for p, why in found.skipped]
    entries = parallel_map(lambda p: inspect_file(p, min_side, max_aspect, bucket_of, resolution), found.images,
                           workers, "checking images", progress)
    for e in entries:
        findings += [Finding(str(e["path"]), why, fix, "image", sev) for why, fix, sev in e["problems"]]
    findings += caption_findings(found, root, max_tokens, tokenizer, fallback, trigger, caption_extensions)
    findings += duplicate_findings([e for e in entries if e["sha"]], near_bits)
    notes = folder_notes(root, found, skipped=False)
    if mask_dir is not None:
        more, mask_notes = mask_findings(found, root, mask_dir, {e["path"]: e["size"] for e in entries}, workers,
                                         progress)
        findings += more
        notes += mask_notes
    order = {"folder": 0, "image": 1, "mask": 2, "caption": 3, "duplicate": 4}
    findings.sort(key=lambda f: (f.path, order[f.kind]))
    return Report(str(root), len(found.images), findings, notes)


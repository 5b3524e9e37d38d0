"""`imglora-data stats DIR`: sizes, the bucket each image trains in (the trainer's own collect, scan and
bucketing code), tag frequencies and caption lengths; `--plot` draws them."""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path

from imglora.data import MIN_IMAGE_SIDE
from imglora.data.buckets import bucketer
from imglora.data.captions import collect_items
from imglora.data.scan import scan_items
from imglora.errors import ImgloraError, escaped, shown

from .check import count_tokens


def folder_stats(root, resolution: int = 64, step: int = 64, no_upscale: bool = False, tokenizer=None,
                 min_bucket: int | None = None, max_bucket: int | None = None, fallback: str | None = None,
                 workers: int | None = None, progress: bool = True, min_side: int = MIN_IMAGE_SIDE) -> dict:
    """Counts, sizes, buckets, tags and caption lengths of a folder, as the trainer would see it: the
    trainer's scan decides what is usable (too small, uncaptioned and broken images are left out of the
    buckets, as training skips them) and the trainer's bucket rule where each usable image goes."""
    bucket_of = bucketer(resolution, step, min_bucket, max_bucket, no_upscale)
    notes: list[str] = []
    items = collect_items(root, fallback=fallback, log=notes.append)
    if not items:
        raise ImgloraError("no images found", "put .png/.jpg/.webp images (with .txt captions) in it", path=root)
    scan = scan_items(items, min_side=min_side, workers=workers, progress=progress)
    usable = {it.image for it in scan.ok}
    skipped = {p.path: p.reason for p in scan.problems}
    per_image, per_bucket, tags, lengths, upscaled = [], Counter(), Counter(), [], 0
    exact = tokenizer is not None
    for item in items:
        info = scan.infos.get(item.image)
        if info is None:  # unreadable: listed, with no size
            per_image.append({"path": str(item.image), "size": None, "bucket": None, "repeats": item.repeats,
                              "skipped": skipped[item.image]})
            continue
        w, h = info.size
        entry = {"path": str(item.image), "size": [w, h], "bucket": None, "repeats": item.repeats}
        if item.image in usable:
            bucket = bucket_of(w, h)
            per_bucket[bucket] += max(1, item.repeats)
            upscaled += w * h < bucket[0] * bucket[1]
            entry["bucket"] = f"{bucket[0]}x{bucket[1]}"
        else:
            entry["skipped"] = skipped[item.image]
        if item.caption:
            tags.update(t.strip() for t in item.caption.split(",") if t.strip())
            entry["tokens"] = count_tokens(item.caption, tokenizer)[0]
            lengths.append(entry["tokens"])
        per_image.append(entry)
    sizes = [tuple(i["size"]) for i in per_image if i["size"]]
    return {
        "folder": str(root), "images": len(items), "usable": len(scan.ok), "unreadable": len(items) - len(scan.infos),
        "captioned": sum(1 for i in items if i.caption), "resolution": resolution, "bucket_step": step,
        "sizes": _size_summary(sizes), "upscaled": upscaled,
        "buckets": {f"{w}x{h}": n for (w, h), n in sorted(per_bucket.items())},
        "top_tags": tags.most_common(30),
        "caption_tokens": {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths),
                           "over_77": sum(n > 77 for n in lengths), "exact": exact} if lengths else {},
        "per_image": per_image, "notes": notes,
    }


def _size_summary(sizes: list[tuple[int, int]]) -> dict:
    if not sizes:
        return {}
    ws, hs = zip(*sizes)
    mp = [w * h / 1e6 for w, h in sizes]
    return {"width": [min(ws), statistics.median(ws), max(ws)], "height": [min(hs), statistics.median(hs), max(hs)],
            "megapixels": [round(min(mp), 3), round(statistics.median(mp), 3), round(max(mp), 3)],
            "portrait": sum(h > w for w, h in sizes), "landscape": sum(w > h for w, h in sizes),
            "square": sum(w == h for w, h in sizes)}


def render(stats: dict) -> str:
    """The stats as a short text report."""
    lines = [f"images: {stats['images']} ({stats['usable']} usable, {stats['unreadable']} unreadable, "
             f"{stats['captioned']} captioned)"]
    lines += [f"skipped {shown(i['path'])}: {escaped(i['skipped'])}" for i in stats["per_image"] if "skipped" in i]
    s = stats["sizes"]
    if s:
        lines.append(f"width  min/median/max: {s['width'][0]} / {s['width'][1]:g} / {s['width'][2]}")
        lines.append(f"height min/median/max: {s['height'][0]} / {s['height'][1]:g} / {s['height'][2]}")
        lines.append(f"shape: {s['landscape']} landscape, {s['portrait']} portrait, {s['square']} square")
    lines.append(f"buckets at {stats['resolution']} px, step {stats['bucket_step']} (usable images x repeats; "
                 f"{stats['upscaled']} image(s) upscaled):")
    width = max((len(b) for b in stats["buckets"]), default=0)
    top = max(stats["buckets"].values(), default=1)
    lines += [f"  {b:>{width}}  {n:6d} {'#' * max(1, round(40 * n / top))}" for b, n in stats["buckets"].items()]
    t = stats["caption_tokens"]
    if t:
        how = "" if t["exact"] else ", estimated (--tokenizer counts exactly)"
        lines.append(f"caption length in CLIP tokens{how}: min {t['min']}, median {t['median']:g}, max {t['max']}; "
                     f"{t['over_77']} over 77")
    if stats["top_tags"]:
        lines.append("top tags: " + ", ".join(f"{tag} ({n})" for tag, n in stats["top_tags"][:15]))
    return "\n".join(lines)


def figure(stats: dict):
    """The charts: image sizes, buckets, caption lengths and top tags (matplotlib, imported only here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(21, 5))
    sizes = [i["size"] for i in stats["per_image"] if i["size"]]
    if sizes:
        ws, hs = zip(*sizes)
        axes[0].scatter(ws, hs, s=8, alpha=0.5)
    axes[0].set(title="image sizes", xlabel="width", ylabel="height")
    names = list(stats["buckets"])
    axes[1].bar(range(len(names)), list(stats["buckets"].values()))
    axes[1].set_xticks(range(len(names)), names, rotation=70, fontsize=7)
    axes[1].set(title=f"buckets at {stats['resolution']} px", ylabel="images x repeats")
    lengths = [i["tokens"] for i in stats["per_image"] if "tokens" in i]
    if lengths:
        axes[2].hist(lengths, bins=range(0, max(lengths) + 2))
    axes[2].axvline(77, color="red", linestyle="--", label="77: CLIP reads no further")
    axes[2].legend(fontsize=7)
    exact = stats["caption_tokens"].get("exact")
    axes[2].set(title="caption length", xlabel="CLIP tokens" + ("" if exact else " (estimated)"), ylabel="captions")
    tags = stats["top_tags"][:20][::-1]
    axes[3].barh([t[:30] for t, _ in tags], [n for _, n in tags])
    axes[3].tick_params(labelsize=7)
    axes[3].set(title="top tags")
    fig.tight_layout()
    return fig


def plot(stats: dict, path, overwrite: bool = False) -> Path:
    """The charts as one PNG, written atomically (never over an existing file without `overwrite`)."""
    import matplotlib.pyplot as plt

    from imglora.formats.files import atomic_write

    if Path(path).exists() and not overwrite:
        raise ImgloraError("already exists", "choose another name or pass --overwrite", path=path)
    fig = figure(stats)
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), overwrite=overwrite)
    finally:
        plt.close(fig)
    return Path(path)

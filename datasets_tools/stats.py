"""`imglora-data stats DIR`: sizes, the bucket each image trains in (the trainer's own bucketing), tags and
caption lengths; `--plot` draws them."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from imglora.data.buckets import assign_bucket, make_buckets
from imglora.data.captions import collect_items
from imglora.data.scan import scan_items

from .check import count_tokens


def folder_stats(root, resolution: int = 512, step: int = 64, no_upscale: bool = False, tokenizer=None) -> dict:
    items = collect_items(root)
    scan = scan_items(items, min_side=1, progress=True)
    buckets = make_buckets(resolution, step)
    sizes, per_bucket, tags, lengths = [], Counter(), Counter(), []
    for item in scan.ok + [i for i in items if i.problem and i.image in scan.infos]:
        w, h = scan.infos[item.image].size
        sizes.append((w, h))
        per_bucket[assign_bucket(w, h, buckets, no_upscale=no_upscale, step=step)] += 1
        if item.caption:
            tags.update(t.strip() for t in item.caption.split(",") if t.strip())
            lengths.append(count_tokens(item.caption, tokenizer)[0])
    return {
        "images": len(items), "usable": len(scan.ok), "unreadable": len(items) - len(scan.infos),
        "sizes": sizes, "resolution": resolution,
        "buckets": {f"{w}x{h}": n for (w, h), n in sorted(per_bucket.items())},
        "top_tags": tags.most_common(20),
        "caption_tokens": {"min": min(lengths), "median": sorted(lengths)[len(lengths) // 2], "max": max(lengths)}
        if lengths else {},
    }


def render(stats: dict) -> str:
    lines = [f"images: {stats['images']} ({stats['usable']} usable, {stats['unreadable']} unreadable)"]
    if stats["sizes"]:
        ws, hs = zip(*stats["sizes"])
        lines.append(f"sizes: width {min(ws)}-{max(ws)}, height {min(hs)}-{max(hs)}")
    lines.append(f"buckets at {stats['resolution']} px:")
    lines += [f"  {b}: {n}" for b, n in stats["buckets"].items()]
    if stats["caption_tokens"]:
        t = stats["caption_tokens"]
        lines.append(f"caption length (CLIP tokens): min {t['min']}, median {t['median']}, max {t['max']}")
    lines.append("top tags: " + ", ".join(f"{tag} ({n})" for tag, n in stats["top_tags"][:10]))
    return "\n".join(lines)


def plot(stats: dict, path) -> Path:
    """Size scatter, bucket histogram and top tags in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from imglora.formats.files import atomic_write

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    if stats["sizes"]:
        ws, hs = zip(*stats["sizes"])
        axes[0].scatter(ws, hs, s=8, alpha=0.5)
    axes[0].set(title="image sizes", xlabel="width", ylabel="height")
    names = list(stats["buckets"])
    axes[1].bar(range(len(names)), list(stats["buckets"].values()))
    axes[1].set_xticks(range(len(names)), names, rotation=60, fontsize=7)
    axes[1].set(title=f"buckets at {stats['resolution']} px")
    tags = stats["top_tags"][:15][::-1]
    axes[2].barh([t for t, _ in tags], [n for _, n in tags])
    axes[2].tick_params(labelsize=7)
    axes[2].set(title="top tags")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), overwrite=True)
    plt.close(fig)
    return Path(path)

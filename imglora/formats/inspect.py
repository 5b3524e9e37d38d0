"""`imglora inspect`: what an adapter file is, for people (render) and machines (describe)."""

from __future__ import annotations

import json
import os
from collections import Counter

from ..errors import escaped, shown
from ..lora.state import split_component
from .clients import client_misses
from .files import read_header
from .detect import ARCH_NAMES
from .embeddings import PREFIX as BUNDLE, read_bundled
from .lora_file import load_adapter

JSON_KEYS = ("ss_tag_frequency", "ss_datasets", "ss_network_args", "imglora.config", "lora_adapter_metadata",
             "imglora.merged_from", "ss_dataset_dirs")


# What a format is called where people read it. load_adapter's own names stay as they were ("peft" is the
# diffusers-PEFT format imglora writes with --to diffusers; "diffusers" is the example scripts' older keys).
FORMAT_NAMES = {"peft": "diffusers", "diffusers": "diffusers-script"}


def format_name(fmt: str) -> str:
    """load_adapter's format name as shown to people: kohya, diffusers, diffusers-script, attn-procs, comfyui."""
    return FORMAT_NAMES.get(fmt, fmt)


CONTAINERS = {"transformer_blocks", "attentions", "resnets", "downsamplers", "upsamplers", "layers", "mid_block"}


def target_kind(path: str) -> str:
    """'down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0' -> 'attn2.to_out'."""
    words = [w for w in path.split(".") if not w.isdigit()]
    cut = max((i for i, w in enumerate(words) if w in CONTAINERS), default=-1)
    return ".".join(words[cut + 1:]) or words[-1]


def describe(path: str | os.PathLike) -> dict:
    adapter, fmt = load_adapter(path)
    targets: dict[str, Counter] = {}
    for key in adapter.modules:
        component, p = split_component(key)
        targets.setdefault(component, Counter())[target_kind(p)] += 1
    metadata, warnings = {}, []
    for k, v in sorted(adapter.metadata.items()):
        if k in JSON_KEYS:
            try:
                metadata[k] = json.loads(v)
                continue
            except ValueError:
                warnings.append(f"metadata {k} is not valid JSON; shown raw")
        metadata[k] = v
    embeddings = read_bundled(path)
    if fmt == "kohya":
        keys = [k for k in read_header(path)[0] if not k.startswith(BUNDLE)]
        warnings += [f"A1111/ComfyUI would ignore {line}" for line in client_misses(keys, adapter.arch)]
    elif fmt != "comfyui":
        warnings.append(f"a diffusers-style ({format_name(fmt)}) file: ComfyUI ignores its UNet attention keys and "
                        "A1111 reads none of it; share the kohya format (imglora convert --to kohya)")
    return {
        "file": os.fspath(path),
        "format": format_name(fmt),
        "base_model": adapter.arch,
        "base_model_name": ARCH_NAMES.get(adapter.arch, adapter.arch),
        "modules": len(adapter.modules),
        "kinds": dict(sorted(adapter.kinds().items())),
        "parameters": adapter.num_parameters(),
        "rank": dict(sorted(adapter.ranks().items())),
        "alpha": dict(sorted(adapter.alphas().items())),
        "targets": {c: dict(sorted(t.items())) for c, t in targets.items()},
        # bundled textual-inversion tokens: {token: {"vectors": n, "width": {component: width}}}
        "embeddings": {t: {"vectors": p["text_encoder"].shape[0], "width": {c: v.shape[1] for c, v in p.items()}}
                       for t, p in sorted(embeddings.items())},
        "metadata": metadata,
        "warnings": warnings,
    }


def render(info: dict) -> str:
    def counts(c: dict) -> str:
        return ", ".join(f"{k} ({v} modules)" if len(c) > 1 else str(k) for k, v in c.items())

    lines = [
        f"file:        {shown(info['file'])}",
        f"format:      {info['format']}",
        f"base model:  {info['base_model_name']}",
        f"modules:     {info['modules']} ({info['parameters']:,} parameters)",
        f"kind:        {counts(info['kinds'])}",
        f"rank:        {counts(info['rank'])}",
        f"alpha:       {counts(info['alpha'])}",
        "targets:",
    ]
    for component, kinds in info["targets"].items():
        lines.append(f"  {component}: " + ", ".join(f"{k} ×{n}" for k, n in kinds.items()))
    for token, e in info["embeddings"].items():
        widths = ", ".join(f"{c} {w}" for c, w in e["width"].items())
        plural = "s" if e["vectors"] > 1 else ""
        lines.append(f"embedding:   {escaped(token)} ({e['vectors']} vector{plural}; {widths})")
    if info["metadata"]:
        lines.append("metadata:")
        for k, v in info["metadata"].items():
            text = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
            lines.append(f"  {escaped(k)}: {escaped(text if len(text) <= 300 else text[:300] + '…')}")
    lines += [f"warning: {w}" for w in info["warnings"]]
    return "\n".join(lines)

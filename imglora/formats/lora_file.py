"""Reading and writing adapter files: format and base-architecture detection, strict parsing, export."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from ..errors import ImgloraError
from ..lora.state import Adapter, canonical_key, split_component
from . import diffusers as dfmt
from . import kohya
from .clients import client_misses
from .files import read_safetensors, tensor_data_hash, write_safetensors
from .metadata import arch_from_metadata

FORMATS = ("kohya", "comfyui", "peft", "diffusers", "attn-procs")
# Cross-attention key width -> base model (FORMATS.md §3); TE q_proj width likewise.
ATTN2_KEY_DIMS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def detect_format(keys: list[str]) -> str:
    if not keys:
        raise ValueError("no tensors in the file")
    if all(k.startswith(kohya.PREFIXES) for k in keys):
        return "kohya"
    if all(k.startswith(kohya.COMFY_PREFIXES) for k in keys):
        return "comfyui"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "peft"
    if any(".lora.down." in k or ".lora_linear_layer." in k for k in keys):
        return "diffusers"
    if any(k.endswith(("_lora.down.weight", "_lora.up.weight")) for k in keys):
        return "attn-procs"
    raise ValueError("no LoRA keys (expected lora_unet_/lora_te_ kohya keys, ComfyUI diffusion_model. keys or "
                     "diffusers lora_A/lora_B keys)")


def detect_arch(keys: list[str], modules: dict, metadata: dict[str, str]) -> str:
    """sd1, sd2, sdxl or unknown: from the metadata, then the key names, then the layer widths."""
    found = arch_from_metadata(metadata)
    if found:
        return found
    for key, m in modules.items():
        if key.endswith("attn2.to_k") and m.A.reshape(m.A.shape[0], -1).shape[1] in ATTN2_KEY_DIMS:
            return ATTN2_KEY_DIMS[m.A.reshape(m.A.shape[0], -1).shape[1]]
    if any(k.startswith(("lora_te2_", "text_encoder_2.", "lora_unet_input_blocks", "lora_unet_output_blocks",
                         "lora_unet_middle_block")) for k in keys):
        return "sdxl"
    for key, m in modules.items():
        if key.startswith("text_encoder.") and key.endswith("q_proj") and m.A.shape[1] in (768, 1024):
            return {768: "sd1", 1024: "sd2"}[m.A.shape[1]]
    return "unknown"


def load_adapter(path: str | os.PathLike, layers_per_block: int = 2) -> tuple[Adapter, str]:
    """(adapter, format) from any supported file; every problem is an ImgloraError naming the file."""
    tensors, metadata = read_safetensors(path)
    try:
        fmt = detect_format(list(tensors))
        sdxl_hint = any(k.startswith(("lora_te1_", "lora_te2_")) for k in tensors) or \
            arch_from_metadata(metadata) == "sdxl"
        if fmt == "kohya":
            modules = kohya.from_kohya(tensors, sdxl=sdxl_hint, layers_per_block=layers_per_block)
        elif fmt == "comfyui":
            modules = kohya.from_comfy(tensors, layers_per_block=layers_per_block)
        elif fmt == "peft":
            modules = dfmt.from_peft(tensors, metadata)
        else:
            modules = dfmt.from_diffusers_old(tensors)
        # Both spellings of text-encoder paths, with and without `text_model.` (see lora/state.py).
        modules = {canonical_key(k): m for k, m in modules.items()}
        for key, m in modules.items():
            if m.A.dim() not in (2, 4) or m.B.shape[1] != m.A.shape[0]:
                raise ValueError(f"module {key}: lora_down {tuple(m.A.shape)} and lora_up {tuple(m.B.shape)} "
                                 "do not multiply")
    except ValueError as e:
        raise ImgloraError(f"not a usable LoRA file: {e}",
                           "imglora reads kohya/A1111, ComfyUI, diffusers-PEFT, diffusers-script and attn-procs LoRA files",
                           path=path) from None
    arch = detect_arch(list(tensors), modules, metadata)
    return Adapter(modules, metadata, arch), fmt


def save_adapter(path: str | os.PathLike, adapter: Adapter, fmt: str = "kohya", metadata: dict[str, str] | None = None,
                 overwrite: bool = False, layers_per_block: int = 2, dtype: torch.dtype | None = None) -> Path:
    """Write an adapter in kohya (default) or diffusers-PEFT format, with sshs_model_hash over its tensor data."""
    from safetensors.torch import save

    if fmt == "kohya":
        tensors = kohya.to_kohya(adapter, sdxl=adapter.arch == "sdxl", layers_per_block=layers_per_block)
        header = {}
    elif fmt in ("peft", "diffusers"):
        tensors, header = dfmt.to_peft(adapter)
    else:
        raise ImgloraError(f"unknown format {fmt!r}", "use kohya or diffusers", path=path)
    if dtype is not None:
        tensors = {k: t.to(dtype) for k, t in tensors.items()}
    meta = {k: v for k, v in (metadata if metadata is not None else adapter.metadata).items()
            if fmt == "kohya" or k != dfmt.ADAPTER_METADATA_KEY}
    if fmt == "kohya":
        meta.pop(dfmt.ADAPTER_METADATA_KEY, None)  # FORMATS.md §0.2: diffusers would reject the file
        meta.pop("format", None)
    meta.update(header)
    if fmt == "kohya":
        for line in client_misses(list(tensors), adapter.arch):  # before anyone shares the file
            print(f"imglora: warning: {path}: A1111/ComfyUI would ignore {line}", file=sys.stderr)
    # The hash covers tensor data only, so it does not change when it is added to the header.
    data = save({k: t.contiguous().cpu() for k, t in tensors.items()}, metadata={k: str(v) for k, v in meta.items()})
    meta["sshs_model_hash"] = tensor_data_hash(data)
    return write_safetensors(path, tensors, meta, overwrite=overwrite)


def components_of(adapter: Adapter) -> dict[str, int]:
    counts: dict[str, int] = {}
    for key in adapter.modules:
        c = split_component(key)[0]
        counts[c] = counts.get(c, 0) + 1
    return counts


def adapter_name(path: str | os.PathLike, taken: list[str] = ()) -> str:
    """A safe, unused adapter name from a file name ('my.style v2.safetensors' -> 'my_style_v2')."""
    import re

    base = re.sub(r"[^A-Za-z0-9_\-]", "_", Path(path).stem)[:90] or "adapter"
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def attach(adapters, path: str | os.PathLike, weight: float = 1.0, te_weight: float | None = None,
           name: str | None = None, model_arch: str | None = None) -> str:
    """Load a file onto a pipeline's Adapters under `name`; a file for another base model is a clear error."""
    from ..lora.adapters import AdapterError
    from ..models.load import layers_per_block

    adapter, _ = load_adapter(path, layers_per_block(adapters.components["unet"]))
    if model_arch and adapter.arch not in ("unknown", model_arch):
        raise ImgloraError(f"an adapter for {ARCH_NAMES.get(adapter.arch, adapter.arch)}, but the model is "
                           f"{ARCH_NAMES.get(model_arch, model_arch)}", "use an adapter trained for this base model",
                           path=path)
    name = name or adapter_name(path, adapters.names)
    try:
        adapters.load(name, adapter, weight, te_weight)
    except AdapterError as e:
        raise ImgloraError(f"does not fit this model: {e}", "use an adapter trained for this base model",
                           path=path) from None
    return name


ARCH_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "unknown": "an unknown model"}

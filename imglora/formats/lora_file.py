"""Reading and writing adapter files: format and base-architecture detection, strict parsing, export."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch

from ..errors import ImgloraError
from ..lora.modules import LoraModule
from ..lora.state import Adapter, canonical_key
from . import diffusers as dfmt
from . import kohya
from .clients import client_misses
from .detect import arch_from_header, detect_format
from .embeddings import PREFIX as BUNDLE, Embeddings, bundle_tensors, split_bundle
from .files import SAFETENSORS_DTYPES, read_header, read_safetensors, tensor_data_hash, write_safetensors
from .metadata import arch_from_metadata


def load_adapter(path: str | os.PathLike, layers_per_block: int = 2) -> tuple[Adapter, str]:
    """(adapter, format) from any supported file; every problem is an ImgloraError naming the file."""
    tensors, metadata = read_safetensors(path)
    return parse_adapter(tensors, metadata, layers_per_block, path)


def load_adapter_shapes(path: str | os.PathLike, layers_per_block: int = 2) -> Adapter:
    """The adapter's modules as shapes only (meta tensors; alphas and other scalars are read), from the
    header: cheap enough to check every file of a folder against a model when it is listed."""
    header, metadata, start = read_header(path)
    tensors = {}
    with open(path, "rb") as f:
        for key, info in header.items():
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            if math.prod(info["shape"]) <= 1:  # a scalar such as alpha: its value is needed
                a, b = info["data_offsets"]
                f.seek(start + a)
                tensors[key] = torch.frombuffer(bytearray(f.read(b - a)), dtype=dtype).reshape(info["shape"]) \
                    if b > a else torch.empty(info["shape"], dtype=dtype)
            else:
                tensors[key] = torch.empty(info["shape"], dtype=dtype, device="meta")
    adapter, _ = parse_adapter(tensors, metadata, layers_per_block, path)
    return adapter


def parse_adapter(tensors: dict[str, torch.Tensor], metadata: dict[str, str], layers_per_block: int,
                  path: str | os.PathLike) -> tuple[Adapter, str]:
    try:
        for key, t in tensors.items():
            # diffusers writes int64 alphas; (IA)³'s on_input is an integer flag
            integer_ok = key.endswith(".on_input") or (key.endswith(".alpha") and t.dtype != torch.bool)
            if not t.is_floating_point() and not integer_ok:
                raise ValueError(f"tensor {key} holds {str(t.dtype).removeprefix('torch.')} values; adapter "
                                 "weights are floating point")
            if key.endswith(".alpha") and t.numel() != 1:
                raise ValueError(f"alpha {key} has {t.numel()} values instead of one")
        # A1111's bundled textual-inversion tokens are a part of the file; attach() puts them on the pipeline.
        lora, embeddings = split_bundle(tensors)
        if lora and all(k in ("emb_params", "clip_l", "clip_g") or k.startswith("string_to_param") for k in lora):
            raise ValueError(f"this is a textual-inversion embedding ({', '.join(sorted(lora))}), not an adapter; "
                             "imglora loads a token with the adapter file that bundles it")
        fmt = detect_format(list(lora)) if lora or not embeddings else "kohya"  # tokens alone: no modules
        sdxl_hint = any(k.startswith(("lora_te1_", "lora_te2_")) for k in lora) or \
            arch_from_metadata(metadata) == "sdxl"
        if fmt == "kohya":
            modules = kohya.from_kohya(lora, sdxl=sdxl_hint, layers_per_block=layers_per_block)
        elif fmt == "comfyui":
            modules = kohya.from_comfy(lora, layers_per_block=layers_per_block)
        elif fmt == "peft":
            modules = dfmt.from_peft(lora, metadata)
        else:
            modules = dfmt.from_diffusers_old(lora)
        # Both spellings of text-encoder paths, with and without `text_model.` (see lora/state.py).
        modules = {canonical_key(k): m for k, m in modules.items()}
        for key, m in modules.items():
            _check_module(key, m)
    except ValueError as e:
        raise ImgloraError(f"not a usable LoRA file: {e}",
                           "imglora reads kohya/A1111 and LyCORIS (LoRA, LoCon, LoHa, LoKr, DoRA, OFT, BOFT, (IA)³, "
                           "GLoRA, full), ComfyUI, diffusers-PEFT, diffusers-script and attn-procs files",
                           path=path) from None
    arch = arch_from_header({k: tuple(t.shape) for k, t in tensors.items()}, metadata)
    if arch == "unknown" and embeddings and not modules:  # tokens alone: their encoders tell the model
        parts = next(iter(embeddings.values()))
        width = parts["text_encoder"].shape[1]
        arch = "sdxl" if "text_encoder_2" in parts else {768: "sd1", 1024: "sd2"}.get(width, arch)
    return Adapter(modules, metadata, arch), fmt


def _check_module(key: str, m) -> None:
    """The module's own tensors fit together (whether they fit the model is Adapters.check's job)."""
    if isinstance(m, LoraModule):
        if m.A.shape[0] == 0:
            raise ValueError(f"module {key} has rank 0 (an empty lora_down)")
        if m.A.dim() not in (2, 4) or m.B.shape[1] != m.A.shape[0]:
            raise ValueError(f"module {key}: lora_down {tuple(m.A.shape)} and lora_up {tuple(m.B.shape)} "
                             "do not multiply")
    if any(t.numel() == 0 for k, t in m.tensors().items() if k != "alpha"):
        raise ValueError(f"module {key} has an empty tensor (rank 0)")
    try:  # the shapes alone, on the meta device: no arithmetic
        m.on_meta().check()
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"module {key}: its {m.kind} tensors do not fit together "
                         f"({', '.join(f'{k} {tuple(t.shape)}' for k, t in m.tensors().items() if k != 'alpha')})") from e


def save_adapter(path: str | os.PathLike, adapter: Adapter, fmt: str = "kohya", metadata: dict[str, str] | None = None,
                 overwrite: bool = False, layers_per_block: int = 2, dtype: torch.dtype | None = None,
                 embeddings: Embeddings | None = None) -> Path:
    """Write an adapter in kohya (default) or diffusers-PEFT format, with sshs_model_hash over its tensor data.
    embeddings: textual-inversion tokens, bundled as A1111 reads them (kohya format only: diffusers'
    load_lora_weights refuses a file with keys that are not LoRA's)."""
    from safetensors.torch import save

    if fmt == "kohya":
        tensors = kohya.to_kohya(adapter, sdxl=adapter.arch == "sdxl", layers_per_block=layers_per_block)
        tensors.update(bundle_tensors(embeddings or {}))
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
        for line in client_misses([k for k in tensors if not k.startswith(BUNDLE)], adapter.arch):  # before sharing
            print(f"imglora: warning: {path}: A1111/ComfyUI would ignore {line}", file=sys.stderr)
    # The hash covers tensor data only, so it does not change when it is added to the header.
    data = save({k: t.contiguous().cpu() for k, t in tensors.items()}, metadata={k: str(v) for k, v in meta.items()})
    meta["sshs_model_hash"] = tensor_data_hash(data)
    return write_safetensors(path, tensors, meta, overwrite=overwrite)

"""Textual-inversion embeddings in files: bundled inside an adapter (A1111's `bundle_emb.*` keys) and standalone.

In memory an adapter's embeddings are {token: {component: tensor (vectors, width)}}, component being
`text_encoder` (SD1/SD2's one CLIP, SDXL's CLIP-L) or `text_encoder_2` (SDXL's CLIP-G).

Key names, as A1111 reads them (`extensions-builtin/Lora/networks.py` `load_network`: a key whose part
before the first dot is `bundle_emb` is `bundle_emb.TOKEN.FIELD`, FIELD `string_to_param.*` or another
name; `modules/textual_inversion/textual_inversion.py` `create_embedding_from_data` then takes
`string_to_param`, `clip_l` + `clip_g`, or a single tensor under any name):

| model | bundled in the adapter | standalone file (A1111, ComfyUI, diffusers) |
|---|---|---|
| SD1/SD2 | `bundle_emb.TOKEN.string_to_param.*` | `emb_params` (kohya's TI writer) |
| SDXL | `bundle_emb.TOKEN.clip_l`, `bundle_emb.TOKEN.clip_g` | `clip_l`, `clip_g` (ComfyUI picks one per encoder) |

Reading also takes `bundle_emb.TOKEN.emb_params` and OneTrainer's SD1 `bundle_emb.TOKEN.clip_l`.
"""

from __future__ import annotations

import os

import torch

from ..errors import ImgloraError, shown
from .files import read_header

PREFIX = "bundle_emb."
# FIELD after the token -> the text encoder it belongs to
FIELDS = {"string_to_param": "text_encoder", "emb_params": "text_encoder", "clip_l": "text_encoder",
          "clip_g": "text_encoder_2"}

Embeddings = dict[str, dict[str, torch.Tensor]]


def split_bundle(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Embeddings]:
    """(the adapter's other tensors, its bundled embeddings); ValueError naming a malformed key.
    Works on meta tensors (shapes only)."""
    rest: dict[str, torch.Tensor] = {}
    found: Embeddings = {}
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            rest[key] = t
            continue
        token, _, field = key[len(PREFIX):].partition(".")
        field = "string_to_param" if field.startswith("string_to_param.") else field
        component = FIELDS.get(field)
        if not token or component is None:
            raise ValueError(f"unrecognised embedding key {key} (bundled embeddings are bundle_emb.TOKEN."
                             "string_to_param.*, .emb_params, or .clip_l and .clip_g)")
        if component in found.setdefault(token, {}):
            raise ValueError(f"embedding {token} has two tensors for its {component} ({key})")
        if not t.is_floating_point() or t.dim() not in (1, 2) or t.numel() == 0:
            raise ValueError(f"embedding tensor {key} has shape {tuple(t.shape)} and dtype "
                             f"{str(t.dtype).removeprefix('torch.')}; expected floats (vectors, width)")
        found[token][component] = t if t.dim() == 2 else t[None]
    for token, parts in found.items():
        if "text_encoder" not in parts:
            raise ValueError(f"embedding {token} has clip_g but no clip_l")
        if len({t.shape[0] for t in parts.values()}) > 1:
            raise ValueError(f"embedding {token}: clip_l and clip_g have different vector counts "
                             f"({parts['text_encoder'].shape[0]} and {parts['text_encoder_2'].shape[0]})")
    return rest, found


def bundle_tensors(embeddings: Embeddings) -> dict[str, torch.Tensor]:
    """The bundle_emb.* keys A1111 reads for these embeddings (SDXL when they have a text_encoder_2 part)."""
    out = {}
    for token, parts in embeddings.items():
        if "text_encoder_2" in parts:
            out[f"{PREFIX}{token}.clip_l"] = parts["text_encoder"]
            out[f"{PREFIX}{token}.clip_g"] = parts["text_encoder_2"]
        else:
            out[f"{PREFIX}{token}.string_to_param.*"] = parts["text_encoder"]
    return out


def standalone_tensors(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One token's embedding file as A1111, ComfyUI and diffusers' load_textual_inversion read it."""
    if "text_encoder_2" in parts:
        return {"clip_l": parts["text_encoder"], "clip_g": parts["text_encoder_2"]}
    return {"emb_params": parts["text_encoder"]}


def read_bundled(path: str | os.PathLike) -> Embeddings:
    """The embeddings bundled in an adapter file ({} when it has none); reads only their tensors."""
    from safetensors import safe_open

    header, _, _ = read_header(path)
    keys = [k for k in header if k.startswith(PREFIX)]
    if not keys:
        return {}
    with safe_open(os.fspath(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in keys}
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ImgloraError(f"tensor {key!r} contains NaN or Inf values", "retrain or re-export it", path=path)
    try:
        return split_bundle(tensors)[1]
    except ValueError as e:
        raise ImgloraError(f"not a usable embedding: {e}", "", path=path) from None


def carried_tokens(paths, fmt: str) -> Embeddings:
    """The tokens bundled in the input files of convert, merge or resize, to write into the output (no part of a
    file is lost). A token two inputs bundle with different vectors, or tokens for a format that cannot hold
    them (diffusers), is an error."""
    found: Embeddings = {}
    origin = {}
    for path in paths:
        for token, parts in read_bundled(path).items():
            if token in found and (parts.keys() != found[token].keys() or
                                   not all(torch.equal(t, found[token][c]) for c, t in parts.items())):
                raise ImgloraError(f"the token {token!r} is bundled in {shown(origin[token])} and here with different "
                                   "vectors", "merge one of the two, or retrain one under another token", path=path)
            found.setdefault(token, parts)
            origin.setdefault(token, path)
    if found and fmt not in ("kohya", "lora"):
        raise ImgloraError(f"bundles the token(s) {', '.join(found)}, which the {fmt} format cannot hold",
                           "write the kohya format to keep them (diffusers reads that too)", path=paths[0])
    return found


def vector_counts(embeddings: Embeddings) -> dict[str, int]:
    return {token: parts["text_encoder"].shape[0] for token, parts in embeddings.items()}

"""The kohya/A1111 key format (FORMATS.md §0, §1.4): `lora_unet_<path>.lora_down.weight` etc.

SD1/SD2 UNet paths use diffusers names; SDXL uses the original (sgm) block names, and its text
encoders are `lora_te1_`/`lora_te2_`. kohya names replace every '.' by '_', which is not invertible
by string replacement, so names are parsed with the vocabulary of compound words below.
"""

from __future__ import annotations

import functools

import torch

from ..lora.modules import KIND_SUFFIXES, SHARED_SUFFIXES, Module, module_from_parts

from ..lora.state import Adapter, split_component
from .detect import KOHYA_PREFIXES

# Multi-word names in diffusers, CLIP and sgm module paths; everything else is one word per '_'.
COMPOUNDS = {
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in",
    "proj_out", "conv_shortcut", "time_emb_proj", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
    "linear_1", "linear_2", "add_embedding", "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
    "final_layer_norm", "text_projection", "input_blocks", "output_blocks", "middle_block", "in_layers",
    "out_layers", "emb_layers", "skip_connection", "time_embed", "label_emb", "add_k_proj", "add_v_proj",
    "position_embedding", "token_embedding", "layer_norm1", "layer_norm2",
}


def parse_name(name: str) -> str:
    """'down_blocks_0_attentions_0_proj_in' -> 'down_blocks.0.attentions.0.proj_in'."""
    tokens = name.split("_")
    out, i = [], 0
    while i < len(tokens):
        for n in (3, 2):
            word = "_".join(tokens[i:i + n])
            if i + n <= len(tokens) and word in COMPOUNDS:
                out.append(word)
                i += n
                break
        else:
            out.append(tokens[i])
            i += 1
    return ".".join(out)


# -- SDXL block names (FORMATS.md §1.3-1.4) -------------------------------------------------------
RESNET_TO_SGM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                 "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}
TOP_TO_SGM = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
              "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


MAX_BLOCKS = 4  # SD 1.x/2.x have four down and up blocks, SDXL three


@functools.cache
def _block_tables(layers_per_block: int) -> tuple[dict, dict]:
    """{diffusers prefix: (sgm prefix, inner renames)} and its inverse, built once from one list, so the
    two directions are inverses by construction (FORMATS.md §1.4)."""
    n = layers_per_block + 1
    rows = [(d, s, {}) for d, s in TOP_TO_SGM.items()]
    rows += [("mid_block.resnets.0", "middle_block.0", RESNET_TO_SGM), ("mid_block.attentions.0", "middle_block.1", {}),
             ("mid_block.resnets.1", "middle_block.2", RESNET_TO_SGM)]
    for i in range(MAX_BLOCKS):
        for j in range(layers_per_block):
            rows.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{i * n + j + 1}.0", RESNET_TO_SGM))
            rows.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{i * n + j + 1}.1", {}))
        rows.append((f"down_blocks.{i}.downsamplers.0", f"input_blocks.{(i + 1) * n}.0", {"conv": "op"}))
        for j in range(n):
            rows.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{i * n + j}.0", RESNET_TO_SGM))
            rows.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{i * n + j}.1", {}))
        # Slot 2 sits behind an attention; an up block without one (SD 1.x's first) has its upsampler in
        # slot 1. Only SDXL files are written with these names, and its upsampling blocks have attentions.
        rows.append((f"up_blocks.{i}.upsamplers.0", f"output_blocks.{i * n + layers_per_block}.2", {}))
    to_sgm = {d: (s, inner) for d, s, inner in rows}
    to_diffusers = {s: (d, {v: k for k, v in inner.items()}) for d, s, inner in rows}
    for i in range(MAX_BLOCKS):  # read-only alias: the slot-1 upsampler of original SD 1.x checkpoints
        to_diffusers[f"output_blocks.{i * n + layers_per_block}.1.conv"] = (f"up_blocks.{i}.upsamplers.0.conv", {})
    return to_sgm, to_diffusers


def _rename(path: str, table: dict) -> str:
    """Rename the longest prefix of `path` found in `table`, then the part after it."""
    parts = path.split(".")
    for k in range(len(parts), 0, -1):
        hit = table.get(".".join(parts[:k]))
        if hit:
            prefix, inner = hit
            rest = ".".join(parts[k:])
            for a, b in inner.items():
                if rest == a or rest.startswith(a + "."):
                    rest = b + rest[len(a):]
                    break
            return f"{prefix}.{rest}" if rest else prefix
    return path


def diffusers_to_sgm(path: str, layers_per_block: int = 2) -> str:
    """A diffusers UNet module path in original-SD (sgm) block names."""
    return _rename(path, _block_tables(layers_per_block)[0])


def sgm_to_diffusers(path: str, layers_per_block: int = 2) -> str:
    """The inverse of diffusers_to_sgm."""
    return _rename(path, _block_tables(layers_per_block)[1])


# -- whole files ----------------------------------------------------------------------------------
def te_prefix(component: str, sdxl: bool) -> str:
    if not sdxl:
        return "lora_te_"
    return "lora_te1_" if component == "text_encoder" else "lora_te2_"


def module_name(key: str, sdxl: bool, layers_per_block: int = 2) -> str:
    """'unet.down_blocks.1…to_q' -> 'lora_unet_input_blocks_4_1…to_q' (SDXL) / 'lora_unet_down_blocks_1…' (SD1/2)."""
    component, path = split_component(key)
    if component == "unet":
        if sdxl:
            path = diffusers_to_sgm(path, layers_per_block)
        return "lora_unet_" + path.replace(".", "_")
    return te_prefix(component, sdxl) + path.replace(".", "_")


def to_kohya(adapter: Adapter, sdxl: bool, layers_per_block: int = 2) -> dict[str, torch.Tensor]:
    """Every module's tensors under its kohya name with the LyCORIS suffixes (lora_down/lora_up and a
    nonzero 0-dim alpha for LoRA, FORMATS.md §0.2; hada_*, lokr_*, diff, dora_scale for the others)."""
    out = {}
    for key, m in adapter.modules.items():
        name = module_name(key, sdxl, layers_per_block)
        for suffix, t in m.tensors().items():
            out[f"{name}.{suffix}"] = t.contiguous()
    return out


# Other spellings of the LoRA pair that kohya-family writers use, including diffusers' convert_state_dict_to_kohya
# leaving `_lora.down.weight` on UNet keys it did not convert (FORMATS.md §1.4).
_LORA_ALIASES = (
    ("_lora.down.weight", "lora_down.weight"), ("_lora.up.weight", "lora_up.weight"),
    ("_lora_linear_layer.down.weight", "lora_down.weight"), ("_lora_linear_layer.up.weight", "lora_up.weight"),
    (".lora_A.weight", "lora_down.weight"), (".lora_B.weight", "lora_up.weight"),
)
# Every tensor name a module may have after its name and a dot, longest first (so diff_b is not read as diff).
_SUFFIXES = sorted(set().union(*KIND_SUFFIXES.values(), SHARED_SUFFIXES), key=len, reverse=True)


def _group(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {suffix: tensor}}; a key that ends in no known tensor name is an error naming it."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        for alias, suffix in _LORA_ALIASES:
            if key.endswith(alias):
                name = key[: -len(alias)]
                break
        else:
            suffix = next((x for x in _SUFFIXES if key.endswith("." + x)), None)
            if suffix is None:
                raise ValueError(f"unrecognised key {key}")
            name = key[: -len(suffix) - 1]
        parts.setdefault(name, {})[suffix] = t
    return parts


def _module(name: str, p: dict[str, torch.Tensor]) -> Module:
    m = module_from_parts(name, p)
    if getattr(m, "alpha", None) == 0 and m.kind not in ("oft", "boft"):  # OFT's alpha is a constraint; 0: none
        # kohya reads 0 as "= rank", ComfyUI/A1111/PEFT as "disabled": refuse to guess (FORMATS.md §2).
        raise ValueError(f"module {name} has alpha 0, which tools read differently (rank or disabled); "
                         "re-export it with alpha = rank")
    return m


SGM_ROOTS = ("input_blocks", "middle_block", "output_blocks", "out.", "time_embed", "label_emb")


def from_kohya(tensors: dict[str, torch.Tensor], sdxl: bool, layers_per_block: int = 2) -> dict[str, Module]:
    """Parse kohya keys into modules keyed 'component.path'. Raises ValueError naming the first bad key."""
    modules = {}
    for name, p in _group(tensors).items():
        if "." in name:  # kohya names have no dots: this key ends in a tensor name imglora does not know
            raise ValueError(f"unrecognised key {name}.{next(iter(p))}")
        for prefix in KOHYA_PREFIXES:
            if name.startswith(prefix):
                rest = name[len(prefix):]
                break
        else:
            raise ValueError(f"key {name} does not start with one of {', '.join(KOHYA_PREFIXES)}")
        path = parse_name(rest)
        if prefix == "lora_unet_":
            component = "unet"
            if path.startswith(SGM_ROOTS):
                path = sgm_to_diffusers(path, layers_per_block)
        else:
            component = "text_encoder_2" if prefix == "lora_te2_" else "text_encoder"
        modules[f"{component}.{path}"] = _module(name, p)
    return modules


# ComfyUI's own writers (its LoRA extractor and trainer) use the dotted module paths of its models:
# `diffusion_model.<original (LDM/sgm) UNet path>` and `text_encoders.<clip_l|clip_h|clip_g>.transformer.<CLIP path>`.
COMFY_CLIPS = {"clip_l": "text_encoder", "clip_h": "text_encoder", "clip_g": "text_encoder_2"}


def from_comfy(tensors: dict[str, torch.Tensor], layers_per_block: int = 2) -> dict[str, Module]:
    modules = {}
    for name, p in _group(tensors).items():
        if name.startswith("diffusion_model."):
            key = "unet." + sgm_to_diffusers(name[len("diffusion_model."):], layers_per_block)
        else:
            clip, _, rest = name[len("text_encoders."):].partition(".")
            if clip not in COMFY_CLIPS or not rest.startswith("transformer."):
                raise ValueError(f"key {name}: unknown text encoder {clip!r} (expected clip_l, clip_h or clip_g)")
            key = f"{COMFY_CLIPS[clip]}.{rest[len('transformer.'):]}"
        modules[key] = _module(name, p)
    return modules

"""Would A1111 and ComfyUI use every key of a kohya-format file? Their naming rules, as regexes.

Both loaders look each key's module name up in tables built from their own models and skip, with no
more than a log line, whatever does not match (FORMATS.md §5.2-5.3). These are the name shapes those
tables accept, read from A1111's `extensions-builtin/Lora/networks.py` (`convert_diffusers_name_to_compvis`
and its `lora_unet` -> `diffusion_model` fallback) and ComfyUI's `comfy/lora.py` (`model_lora_keys_unet`,
`model_lora_keys_clip`). They are written out here, not derived from imglora's own exporter, so that a
naming mistake of ours shows up as a miss instead of agreeing with itself.
"""

from __future__ import annotations

import re

# UNet: diffusers block names (both loaders map them to the original ones) or the original (sgm) names.
_UNET = re.compile(
    r"^lora_unet_(?:"
    r"(?:down_blocks_\d+_(?:attentions|resnets)_\d+|mid_block_(?:attentions|resnets)_\d+"
    r"|up_blocks_\d+_(?:attentions|resnets)_\d+)_[a-z0-9_]+"
    r"|down_blocks_\d+_downsamplers_0_conv|up_blocks_\d+_upsamplers_0_conv"
    r"|conv_in|conv_out|time_embedding_linear_[12]"
    r"|(?:input_blocks_\d+_\d+|middle_block_\d+|output_blocks_\d+_\d+)_[a-z0-9_]+"
    r"|time_embed_[02]|label_emb_0_[02]|out_2)$")
# Text encoders: ComfyUI maps exactly these six projections per layer, under `text_model` (kohya's names).
_TE = re.compile(r"^(lora_te[12]?)_text_model_encoder_layers_(\d+)_(self_attn_[qkv]_proj|self_attn_out_proj|mlp_fc[12])$")
_TE_ATTN = {"self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj"}
# The tensor names both loaders read (A1111's network_lora/_hada/_lokr/_full modules, ComfyUI's weight_adapter).
_TENSORS = (".lora_down.weight", ".lora_up.weight", ".lora_mid.weight", ".alpha", ".dora_scale", ".hada_w1_a",
            ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2", ".lokr_w1", ".lokr_w1_a", ".lokr_w1_b",
            ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2", ".diff", ".diff_b", ".w_norm", ".b_norm",
            ".oft_blocks", ".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight")
# Read by one of the two only: A1111's network_ia3 ((IA)³; ComfyUI has no such adapter), and ComfyUI's OFT
# rescale (A1111's network_oft applies the rotation without it).
_ONE_CLIENT = {".weight": "(IA)³ tensors, which ComfyUI does not read (A1111 does)",
               ".on_input": "(IA)³ tensors, which ComfyUI does not read (A1111 does)",
               ".rescale": "OFT rescale tensors, which A1111 ignores (ComfyUI reads them)"}


def client_misses(keys: list[str], arch: str) -> list[str]:
    """One line per kind of problem (with an example key) for a kohya-format file; [] when both loaders
    would use every key."""
    problems: dict[str, list[str]] = {}

    def miss(why: str, key: str) -> None:
        problems.setdefault(why, []).append(key)

    attention: dict[tuple[str, str], set[str]] = {}
    for key in keys:
        module, dot, tensor = key.partition(".")
        if dot and f".{tensor}" in _ONE_CLIENT:
            miss(_ONE_CLIENT[f".{tensor}"], key)
        elif not dot or f".{tensor}" not in _TENSORS:
            miss("tensor names A1111 and ComfyUI do not read (expected .lora_down.weight, .lora_up.weight, "
                 ".alpha or the LyCORIS names)", key)
        if module.startswith("lora_unet_"):
            if not _UNET.match(module):
                miss("UNet modules neither loader maps", key)
            continue
        m = _TE.match(module)
        if not m:
            miss("text-encoder modules neither loader maps (they must read "
                 "lora_te[1|2]_text_model_encoder_layers_N_self_attn_q_proj and the like)", key)
            continue
        prefix, layer, proj = m.groups()
        if arch == "sdxl" and prefix == "lora_te":
            miss("SDXL text-encoder keys with lora_te_ (A1111 needs lora_te1_/lora_te2_)", key)
        if arch != "sdxl" and prefix == "lora_te2":
            miss("a second text encoder on a model with one", key)
        if proj in _TE_ATTN:
            attention.setdefault((prefix, layer), set()).add(proj)
    # A1111 applies a LoRA to OpenCLIP's fused attention (SD 2.x, SDXL's second encoder) only when all four
    # of q, k, v and out are there (FORMATS.md §5.3).
    for (prefix, layer), found in attention.items():
        if (prefix == "lora_te2" or (prefix == "lora_te" and arch == "sd2")) and found != _TE_ATTN:
            miss("OpenCLIP attention layers without all four of q/k/v/out_proj (A1111 skips them)",
                 f"{prefix}_text_model_encoder_layers_{layer}_self_attn")
    return [f"{len(ks)} key{'s' if len(ks) > 1 else ''}: {why}, e.g. {ks[0]}" for why, ks in problems.items()]

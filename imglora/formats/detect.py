"""What a file is, from its keys and shapes alone: its key format and the base model it was made for.

The app's catalogue reads only headers and the full loader reads tensors; both call these, so a file is
classed the same way everywhere.
"""

from __future__ import annotations

import os
import re

from ..errors import ImgloraError
from .metadata import arch_from_metadata

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
COMFY_PREFIXES = ("diffusion_model.", "text_encoders.")
ARCH_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "unknown": "an unknown model"}
# Cross-attention key width -> base model (FORMATS.md §3); the first text encoder's width likewise.
ATTN2_KEY_DIMS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
TE_DIMS = {768: "sd1", 1024: "sd2"}
SDXL_KEYS = ("lora_te2_", "text_encoder_2.", "lora_unet_input_blocks", "lora_unet_output_blocks",
             "lora_unet_middle_block", "text_encoders.clip_g.")
_DOWN = re.compile(r"(lora_down|lora_A|lora\.down|_lora\.down|lora_linear_layer\.down)\.weight$")
_ATTN2_K = re.compile(r"attn2[._](processor\.)?to_k")


def detect_format(keys: list[str]) -> str:
    if not keys:
        raise ValueError("no tensors in the file")
    if all(k.startswith(KOHYA_PREFIXES) for k in keys):
        return "kohya"
    if all(k.startswith(COMFY_PREFIXES) for k in keys):
        return "comfyui"
    if any(".lora_A." in k or ".lora_B." in k or ".hada_w" in k or ".lokr_w" in k for k in keys):
        return "peft"  # also peft's own LoHa and LoKr tensors under module paths
    if any(".lora.down." in k or ".lora_linear_layer." in k for k in keys):
        return "diffusers"
    if any(k.endswith(("_lora.down.weight", "_lora.up.weight")) for k in keys):
        return "attn-procs"
    raise ValueError("no LoRA keys (expected lora_unet_/lora_te_ kohya keys, ComfyUI diffusion_model. keys or "
                     "diffusers lora_A/lora_B keys)")


def arch_from_header(shapes: dict[str, tuple], metadata: dict[str, str]) -> str:
    """sd1, sd2, sdxl or unknown from {key: shape}: the metadata, then the key names, then the widths of
    the cross-attention keys and of the text encoder."""
    found = arch_from_metadata(metadata)
    if found:
        return found
    if any(k.startswith(SDXL_KEYS) for k in shapes):
        return "sdxl"
    for k, shape in shapes.items():
        if _ATTN2_K.search(k) and _DOWN.search(k) and len(shape) >= 2 and shape[1] in ATTN2_KEY_DIMS:
            return ATTN2_KEY_DIMS[shape[1]]
    for k, shape in shapes.items():
        if "q_proj" in k and k.startswith(("lora_te", "text_encoder")) and _DOWN.search(k) and len(shape) == 2 \
                and shape[1] in TE_DIMS:
            return TE_DIMS[shape[1]]
    return "unknown"


def arch_mismatch(adapter_arch: str, model_arch: str) -> str | None:
    """Why an adapter cannot go on a model of this architecture, or None when it can."""
    if adapter_arch in ("unknown", model_arch):
        return None
    return f"made for {ARCH_NAMES.get(adapter_arch, adapter_arch)}, the model is {ARCH_NAMES.get(model_arch, model_arch)}"


def check_arch(adapter_arch: str, model_arch: str, path: str | os.PathLike | None = None) -> None:
    why = arch_mismatch(adapter_arch, model_arch)
    if why:
        raise ImgloraError(f"an adapter {why}", "use an adapter trained for this base model", path=path)

"""diffusers key formats (FORMATS.md §1.1): PEFT (P), the example scripts' non-PEFT (Dn), old attn-procs (O).

P:  unet.<path>.lora_A.weight / .lora_B.weight; alpha in the `lora_adapter_metadata` header (diffusers >= 0.34)
Dn: unet.<path>.lora.down.weight; text_encoder.<path>.lora_linear_layer.down.weight; no alpha (scale 1)
O:  unet.<…>.attn2.processor.to_q_lora.down.weight (to_out_lora = to_out.0); text encoder to_q_lora = q_proj
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter

import torch

from ..lora.modules import LoraModule, Module, module_from_parts

from ..lora.state import CLIP_ROOT, COMPONENTS, Adapter, split_component

ADAPTER_METADATA_KEY = "lora_adapter_metadata"


def to_peft(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """P-format tensors with the scale baked into lora_B, so lora_alpha == r holds for every module and no
    reader needs the header (ComfyUI ignores it: FORMATS.md §0.6). The header still records r and
    lora_alpha (rank and alpha patterns for mixed ranks), which diffusers reads. Text-encoder keys use the
    module paths of the installed transformers, as diffusers' own writer does."""
    tensors, config = {}, {}
    for component in adapter.components():
        mods = {k: m for k, m in adapter.modules.items() if split_component(k)[0] == component}
        rank = Counter(m.rank for m in mods.values()).most_common(1)[0][0]
        paths = {k: installed_path(k) for k in mods}
        config[f"{component}.r"] = rank
        config[f"{component}.lora_alpha"] = rank
        config[f"{component}.target_modules"] = sorted(paths.values())
        # Full paths as patterns: peft matches them end-anchored, so each names exactly one module.
        odd = {paths[k]: m.rank for k, m in mods.items() if m.rank != rank}
        config[f"{component}.rank_pattern"] = odd
        config[f"{component}.alpha_pattern"] = dict(odd)
        for key, m in mods.items():
            name = f"{component}.{paths[key]}"
            tensors[f"{name}.lora_A.weight"] = m.A.contiguous()
            tensors[f"{name}.lora_B.weight"] = (m.B.float() * m.scale).to(m.B.dtype).contiguous()
    return tensors, {"format": "pt", ADAPTER_METADATA_KEY: json.dumps(config, sort_keys=True)}


def installed_path(key: str) -> str:
    """A canonical key's module path as the installed transformers names it (see lora/state.py)."""
    component, path = split_component(key)
    if component != "unet" and path.startswith(CLIP_ROOT) and not _clip_has_text_model(component):
        return path[len(CLIP_ROOT):]
    return path


@functools.cache
def _clip_has_text_model(component: str) -> bool:
    """Whether the installed transformers' CLIP model for this component has the `text_model` level."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
    with torch.device("meta"):
        model = cls(CLIPTextConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                   num_attention_heads=1, max_position_embeddings=8, projection_dim=8))
    return hasattr(model, "text_model")


def _alphas_from_metadata(metadata: dict[str, str]) -> dict[str, dict]:
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"malformed {ADAPTER_METADATA_KEY} header ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"malformed {ADAPTER_METADATA_KEY} header (not a JSON object)")
    out: dict[str, dict] = {}
    for key, value in config.items():
        component, _, field = key.partition(".")
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if (field == "lora_alpha" and not number) or (field == "alpha_pattern" and not (
                isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values()))):
            raise ValueError(f"malformed {ADAPTER_METADATA_KEY} header ({key} = {str(value)[:40]!r})")
        out.setdefault(component, {})[field] = value
    return out


def _pattern_value(patterns: dict, path: str, default):
    # peft's rule: a pattern matches when the module path ends with it at a '.' boundary.
    for pattern, value in (patterns or {}).items():
        if path == pattern or path.endswith("." + pattern):
            return value
    return default


# peft's own tensor names for its LoRA variants (LoHa, LoKr, DoRA's magnitude) after the module path.
_PEFT_VARIANT = re.compile(r"(.+)\.(hada_w[12]_[ab]|hada_t[12]|lokr_w[12](?:_[ab])?|lokr_t2|lora_magnitude_vector)"
                           r"(?:\.weight)?$")


def from_peft(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, Module]:
    """diffusers-PEFT keys: LoRA pairs (`.lora_A.weight`/`.lora_B.weight`), DoRA's `.lora_magnitude_vector`,
    and peft's LoHa (`.hada_*`) and LoKr (`.lokr_*`) tensors; alphas from the lora_adapter_metadata config."""
    configs = _alphas_from_metadata(metadata)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.match(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
        if m:
            name, role = m[1], m[2]
        elif v := _PEFT_VARIANT.match(key):
            name, role = v[1], v[2]
        else:
            raise ValueError(f"unrecognised key {key}")
        if name.split(".", 1)[0] not in COMPONENTS:  # model-level file (M): UNet keys without a prefix
            name = "unet." + name
        parts.setdefault(name, {})[role] = t
    modules = {}
    for name, p in parts.items():
        component, path = split_component(name)
        cfg = configs.get(component, {})
        if "A" in p or "B" in p:
            if not {"A", "B"} <= p.keys():
                raise ValueError(f"module {name} lacks its lora_{'B' if 'A' in p else 'A'} weight")
            if p.keys() - {"A", "B", "lora_magnitude_vector"}:
                raise ValueError(f"module {name} has tensors of several kinds: {', '.join(sorted(p))}")
            rank = p["A"].shape[0]
            # Without a config, diffusers uses lora_alpha = r (scale 1); 8 is LoraConfig's own default.
            alpha = _pattern_value(cfg.get("alpha_pattern"), path, cfg.get("lora_alpha", 8)) if cfg else rank
            if cfg.get("use_rslora"):
                alpha = alpha * rank ** 0.5  # rslora scales by alpha/√r, which is (alpha·√r)/r
            modules[name] = LoraModule(p["A"], p["B"], float(alpha), dora_scale=p.get("lora_magnitude_vector"))
            continue
        # peft LoHa/LoKr: scale = alpha / r of their config (peft's defaults: r 8, alpha 8).
        r = _pattern_value(cfg.get("rank_pattern"), path, cfg.get("r", 8))
        alpha = _pattern_value(cfg.get("alpha_pattern"), path, cfg.get("alpha", cfg.get("lora_alpha", 8)))
        if any(k.startswith("hada_") for k in p):
            modules[name] = module_from_parts(name, {**p, "alpha": torch.tensor(float(alpha) * p["hada_w1_b"].shape[0]
                                                                                 / r if "hada_w1_b" in p else 1.0)})
        else:
            # peft applies alpha/r whether or not a factor is decomposed: folded into w1, so scale is 1 here.
            parts_ = dict(p)
            w1 = "lokr_w1" if "lokr_w1" in parts_ else "lokr_w1_a"
            if w1 not in parts_:
                raise ValueError(f"module {name} lacks a LoKr factor (lokr_w1 or lokr_w1_a/b)")
            parts_[w1] = parts_[w1] * (float(alpha) / r)
            modules[name] = module_from_parts(name, parts_)
    return modules


_OLD_TE = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}
_OLD_UNET = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}


def from_diffusers_old(tensors: dict[str, torch.Tensor]) -> dict[str, LoraModule]:
    """Dn (example scripts) and O (attn-procs) keys; neither stores alpha, so the scale is 1."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.match(r"(.+?)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$", key)
        if m:
            name, direction = m[1], m[2]
        else:
            m = re.match(r"(.+?)\.(?:processor\.)?(to_[qkv]_lora|to_out_lora)\.(down|up)\.weight$", key)
            if not m:
                if key.endswith(".alpha"):
                    pairs.setdefault(key[: -len(".alpha")], {})["alpha"] = t
                    continue
                raise ValueError(f"unrecognised key {key}")
            parent, proj = m[1], m[2]
            is_te = parent.startswith("text_encoder") or ".self_attn" in parent
            name, direction = f"{parent}.{(_OLD_TE if is_te else _OLD_UNET)[proj]}", m[3]
        if name.split(".", 1)[0] not in COMPONENTS:
            name = "unet." + name  # the oldest attn-procs files have no component prefix
        pairs.setdefault(name, {})["A" if direction == "down" else "B"] = t
    modules = {}
    for name, p in pairs.items():
        if "A" not in p or "B" not in p:
            raise ValueError(f"module {name} lacks its {'up' if 'A' in p else 'down'} weight")
        rank = p["A"].shape[0]
        alpha = float(p["alpha"].item()) if "alpha" in p else float(rank)
        modules[name] = LoraModule(p["A"], p["B"], alpha)
    return modules

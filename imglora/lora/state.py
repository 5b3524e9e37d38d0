"""The in-memory form of a LoRA adapter, independent of any file's key format.

Modules are keyed by their full diffusers path with the pipeline component in front:
`unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q`,
`text_encoder.text_model.encoder.layers.0.self_attn.q_proj`, `text_encoder_2.…`.

Text-encoder paths are the original CLIP ones (`text_model.encoder.…`), which every checkpoint and every
kohya, A1111 and ComfyUI file uses, whatever transformers is installed: transformers 5 dropped the
`text_model` level of CLIPTextModel, so lora/inject.py maps these keys onto the live module tree.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .blocks import multiplier, spec_of
from .modules import Module
from .schedule import Schedule

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass
class Adapter:
    """A whole adapter: its modules, the file metadata it came with, and what it was made for."""

    modules: dict[str, Module]
    metadata: dict[str, str] = field(default_factory=dict)
    arch: str = "unknown"  # "sd1", "sd2", "sdxl" or "unknown"

    def components(self) -> list[str]:
        return [c for c in COMPONENTS if any(k.startswith(c + ".") for k in self.modules)]

    def kinds(self) -> Counter:
        return Counter(m.kind + ("+dora" if getattr(m, "dora_scale", None) is not None else "")
                       for m in self.modules.values())

    def ranks(self) -> Counter:
        return Counter(getattr(m, "rank", None) for m in self.modules.values() if getattr(m, "rank", None))

    def alphas(self) -> Counter:
        return Counter(m.alpha for m in self.modules.values() if getattr(m, "alpha", None) is not None)

    def num_parameters(self) -> int:
        return sum(m.num_parameters() for m in self.modules.values())


@dataclass(frozen=True)
class Blend:
    """Which adapters are on and how strongly: the one value the app, `generate` and the CLI hand to
    Adapters. te_weights holds a separate text-encoder weight where one is given (A1111's te multiplier);
    blocks 26 per-block multipliers (lora/blocks.py, LBW's layout; BASE scales the text encoders);
    schedules a UNet weight that changes over the denoising steps (lora/schedule.py); normalize keeps each
    layer's summed update within the norm of its largest single one (Adapters.apply)."""

    weights: dict[str, float] = field(default_factory=dict)
    te_weights: dict[str, float] = field(default_factory=dict)
    blocks: dict[str, tuple] = field(default_factory=dict)
    schedules: dict[str, Schedule] = field(default_factory=dict)
    normalize: bool = False

    @classmethod
    def of(cls, pairs: dict[str, tuple[float, float | None]]) -> "Blend":
        """From {name: (weight, te_weight or None)}."""
        return cls({n: float(w) for n, (w, _) in pairs.items()},
                   {n: float(te) for n, (_, te) in pairs.items() if te is not None})

    def te(self, name: str) -> float:
        return self.te_weights.get(name, self.weights[name])

    def pairs(self) -> dict[str, tuple[float, float | None]]:
        return {n: (w, self.te_weights.get(n)) for n, w in self.weights.items()}

    @property
    def scheduled(self) -> bool:
        """Its weights change during a generation: it cannot be merged or baked."""
        return any(self.schedules.values())

    def layer_weight(self, name: str, key: str, block: str | None, step: int | None = None,
                     steps: int | None = None) -> float:
        """The multiplier of adapter `name` in the layer `key` (in LBW block `block`) at a 0-based step
        (None: the first step's)."""
        sched = self.schedules.get(name)
        if not key.startswith("unet."):
            base = self.te(name) if name in self.te_weights or not sched else sched.text_encoder(self.weights[name])
            return base * multiplier(self.blocks.get(name), "BASE")
        w = self.weights[name]
        if sched:
            w = sched.weight(w, step or 0, steps or 1)
        return w * multiplier(self.blocks.get(name), block)

    def key(self) -> tuple:
        """Hashable: two blends with equal keys set every layer alike."""
        return (tuple(sorted(self.pairs().items())), tuple(sorted(self.blocks.items())),
                tuple(sorted(self.schedules.items(), key=lambda kv: kv[0])), self.normalize)

    def tag(self, name: str) -> str:
        """One adapter in A1111's prompt syntax, with LBW's and loractl's options where set."""
        sched = self.schedules.get(name) or Schedule()
        unet = sched.keys_text() or f"{self.weights[name]:g}"
        parts = [name] + ([f"{self.te_weights[name]:g}", unet] if name in self.te_weights else [unet])
        if name in self.blocks:
            parts.append(f"lbw={spec_of(self.blocks[name])}")
        return "<lora:" + ":".join(parts + sched.tag_parts()) + ">"

    def tags(self) -> str:
        """The blend in A1111's prompt syntax (<lora:name:w>, <lora:name:te:unet>, lbw=, start=, stop=,
        keyframes), as PNG parameters carry it."""
        return " ".join(self.tag(n) for n, w in self.weights.items()
                        if w or self.te_weights.get(n) or (self.schedules.get(n) and self.schedules[n].keys))

    def __bool__(self) -> bool:
        return bool(self.weights)


def split_component(key: str) -> tuple[str, str]:
    """'unet.down_blocks.0…' -> ('unet', 'down_blocks.0…')."""
    component, _, path = key.partition(".")
    return component, path


CLIP_ROOT = "text_model."
_CLIP_CHILDREN = ("encoder.", "embeddings.", "final_layer_norm")


def canonical_key(key: str) -> str:
    """'text_encoder.encoder.layers.0…' (a transformers-5 module path) -> 'text_encoder.text_model.encoder.layers.0…'."""
    component, path = split_component(key)
    if component != "unet" and path.startswith(_CLIP_CHILDREN):
        return f"{component}.{CLIP_ROOT}{path}"
    return key

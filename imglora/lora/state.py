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

import torch

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass(eq=False)  # identity, not tensor comparison
class LoraModule:
    """One adapted layer: ΔW = (alpha / rank) · B @ A."""

    A: torch.Tensor  # (rank, in) for Linear; (rank, in, kh, kw) for Conv2d
    B: torch.Tensor  # (out, rank) for Linear; (out, rank, 1, 1) for Conv2d
    alpha: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def detached_copy(self) -> "LoraModule":
        """Float32 CPU copies, independent of any live parameter."""
        return LoraModule(self.A.float().cpu().clone(), self.B.float().cpu().clone(), self.alpha)

    def num_parameters(self) -> int:
        return self.A.numel() + self.B.numel()

    def delta(self) -> torch.Tensor:
        """ΔW in float32, shaped like the base weight."""
        A, B = self.A.float(), self.B.float()
        if A.dim() == 2:
            return self.scale * (B @ A)
        # Conv: a k×k down conv followed by a 1×1 up conv is one k×k conv with weight B·A.
        return self.scale * torch.einsum("or,rihw->oihw", B.flatten(1), A)


@dataclass
class Adapter:
    """A whole adapter: its modules, the file metadata it came with, and what it was made for."""

    modules: dict[str, LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)
    arch: str = "unknown"  # "sd1", "sd2", "sdxl" or "unknown"

    def components(self) -> list[str]:
        return [c for c in COMPONENTS if any(k.startswith(c + ".") for k in self.modules)]

    def ranks(self) -> Counter:
        return Counter(m.rank for m in self.modules.values())

    def alphas(self) -> Counter:
        return Counter(m.alpha for m in self.modules.values())

    def num_parameters(self) -> int:
        return sum(m.num_parameters() for m in self.modules.values())


@dataclass(frozen=True)
class Blend:
    """Which adapters are on and how strongly: the one value the app, `generate` and the CLI hand to
    Adapters. te_weights holds a separate text-encoder weight where one is given (A1111's te multiplier)."""

    weights: dict[str, float] = field(default_factory=dict)
    te_weights: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, pairs: dict[str, tuple[float, float | None]]) -> "Blend":
        """From {name: (weight, te_weight or None)}."""
        return cls({n: float(w) for n, (w, _) in pairs.items()},
                   {n: float(te) for n, (_, te) in pairs.items() if te is not None})

    def te(self, name: str) -> float:
        return self.te_weights.get(name, self.weights[name])

    def pairs(self) -> dict[str, tuple[float, float | None]]:
        return {n: (w, self.te_weights.get(n)) for n, w in self.weights.items()}

    def tags(self) -> str:
        """The blend in A1111's prompt syntax (<lora:name:w>, <lora:name:te:unet>), as PNG parameters carry it."""
        return " ".join(f"<lora:{n}:{self.te_weights[n]:g}:{w:g}>" if n in self.te_weights else f"<lora:{n}:{w:g}>"
                        for n, w in self.weights.items() if w or self.te_weights.get(n))

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

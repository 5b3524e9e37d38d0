"""Adapter kinds: how one adapter's weights in one layer are made, stored and turned into ΔW.

A LoraLayer holds one kind object per adapter name (as peft's LoRA variants sit beside its layer).
The layer does the blending (weights, enable, per-sample weights, merging); a kind only knows its
own tensors. A `fused` kind (the plain low-rank pair) is applied by the layer in one stacked matmul
pair with the other fused adapters; any other kind is applied through its materialised `delta()`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .state import LoraModule


class Kind(nn.Module):
    """One adapter's tensors in one layer."""

    fused = False  # True: the layer stacks its (A, B) with the other fused adapters' in one matmul pair
    alpha: float
    dropout: float = 0.0

    def delta(self) -> torch.Tensor:
        """ΔW at weight 1 in float32, shaped like the base weight."""
        raise NotImplementedError

    def state(self):
        """The detached in-memory module (lora/state.py) that files are written from."""
        raise NotImplementedError

    @staticmethod
    def misfit(module, weight: torch.Tensor) -> str | None:
        """Why a file module does not fit a base weight of this shape (None: it fits)."""
        raise NotImplementedError


class LowRank(Kind):
    """The LoRA pair: ΔW = (alpha / rank) · B · A. A is (rank, in) for a Linear and (rank, in, kh, kw)
    for a Conv2d (a k×k down convolution); B is (out, rank), or (out, rank, 1, 1) for a Conv2d."""

    fused = True

    def __init__(self, A: torch.Tensor, B: torch.Tensor, alpha: float, dropout: float = 0.0, trainable: bool = True):
        super().__init__()
        self.A = nn.Parameter(A.contiguous(), requires_grad=trainable)
        self.B = nn.Parameter(B.contiguous(), requires_grad=trainable)
        self.alpha = float(alpha)
        self.dropout = dropout

    @classmethod
    def new(cls, base: nn.Module, rank: int, alpha: float, init: str = "kaiming", dropout: float = 0.0,
            dtype: torch.dtype = torch.float32) -> "LowRank":
        """A trainable pair that starts exactly at the base: A random (Kaiming or Gaussian), B zero."""
        w = base.weight
        A = torch.empty((rank, *w.shape[1:]), device=w.device, dtype=dtype)
        if init == "gaussian":
            nn.init.normal_(A, std=1.0 / rank)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        B = torch.zeros((w.shape[0], rank) + ((1, 1) if w.dim() == 4 else ()), device=w.device, dtype=dtype)
        return cls(A, B, alpha, dropout)

    @classmethod
    def load(cls, base: nn.Module, module: LoraModule, dtype: torch.dtype = torch.float32) -> "LowRank":
        """Frozen trained weights from a file module (which `misfit` has accepted)."""
        w = base.weight
        conv = w.dim() == 4
        A = module.A if conv else module.A.reshape(module.A.shape[0], *w.shape[1:])
        B = module.B.reshape(w.shape[0], module.B.shape[1], *((1, 1) if conv else ()))
        return cls(A.to(w.device, dtype), B.to(w.device, dtype), module.alpha, trainable=False)

    @staticmethod
    def misfit(module: LoraModule, weight: torch.Tensor) -> str | None:
        conv = weight.dim() == 4
        a_in = module.A.shape[1:] if conv else module.A.reshape(module.A.shape[0], -1).shape[1:]
        want_in = tuple(weight.shape[1:]) if conv else (weight.shape[1],)
        if (tuple(a_in) == want_in and module.B.shape[0] == weight.shape[0]
                and module.B.reshape(module.B.shape[0], -1).shape[1] == module.A.shape[0]):
            return None
        return (f"shapes A {tuple(module.A.shape)}, B {tuple(module.B.shape)} do not fit the model's weight "
                f"{tuple(weight.shape)}")

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def state(self) -> LoraModule:
        return LoraModule(self.A.detach(), self.B.detach(), self.alpha)

    def delta(self) -> torch.Tensor:
        return self.state().delta()


def kind_for(module) -> type[Kind]:
    """The kind that holds a file module of this type."""
    if isinstance(module, LoraModule):
        return LowRank
    raise TypeError(f"no adapter kind holds a {type(module).__name__}")

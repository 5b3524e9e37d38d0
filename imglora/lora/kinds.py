"""Adapter kinds: how one adapter's weights in one layer are made, stored and turned into ΔW.

A LoraLayer holds one kind object per adapter name (as peft's LoRA variants sit beside its layer).
The layer does the blending (weights, enable, per-sample weights, merging); a kind only knows its
own tensors. A `fused` kind (the plain low-rank pair) is applied by the layer in one stacked matmul
pair with the other fused adapters; any other kind (`Dense`) through its materialised `delta()`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .modules import LohaModule, LokrModule, LoraModule, Module, WeightModule


class Kind(nn.Module):
    """One adapter's tensors in one layer."""

    fused = False  # True: the layer stacks its (A, B) with the other fused adapters' in one matmul pair
    alpha: float
    dropout: float = 0.0

    def delta(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW at weight 1 in float32, shaped like the base weight (DoRA's depends on the weight itself)."""
        raise NotImplementedError

    def bias_delta(self) -> torch.Tensor | None:
        """What the adapter adds to the base bias at weight 1 (a full delta's diff_b), if anything."""
        return None

    def state(self):
        """The detached in-memory module (lora/modules.py) that files are written from."""
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
        return cls(*cls.new_tensors(base.weight, rank, init, dtype), alpha, dropout)

    @staticmethod
    def new_tensors(w: torch.Tensor, rank: int, init: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        A = torch.empty((rank, *w.shape[1:]), device=w.device, dtype=dtype)
        if init == "gaussian":
            nn.init.normal_(A, std=1.0 / rank)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        B = torch.zeros((w.shape[0], rank) + ((1, 1) if w.dim() == 4 else ()), device=w.device, dtype=dtype)
        return A, B

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

    def delta(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.state().delta()


class Dense(Kind):
    """Any other kind (LoHa, LoKr, a full delta, LoCon Tucker, anything with DoRA): its file-side module's
    tensors as parameters, applied through the ΔW they make. The layer caches that ΔW while the tensors
    stay put, so inference costs one extra matmul (convolution) per layer however the ΔW is built."""

    def __init__(self, module: Module, trainable: bool = True):
        super().__init__()
        self.cls, self.alpha = type(module), getattr(module, "alpha", None)
        tensors = {k: t for k, t in module.tensors().items() if k != "alpha"}
        self.names = {k.replace(".", "_"): k for k in tensors}  # ParameterDict keys cannot hold dots
        self.params = nn.ParameterDict({k.replace(".", "_"): nn.Parameter(t.contiguous(), requires_grad=trainable)
                                        for k, t in tensors.items()})

    @classmethod
    def load(cls, base: nn.Module, module: Module, dtype: torch.dtype = torch.float32) -> "Dense":
        w = base.weight
        moved = module.from_tensors({k: t if k == "alpha" else t.to(w.device, dtype) for k, t in module.tensors().items()})
        return cls(moved, trainable=False)

    @staticmethod
    def misfit(module: Module, weight: torch.Tensor) -> str | None:
        shapes = ", ".join(f"{k} {tuple(t.shape)}" for k, t in module.tensors().items() if k != "alpha")
        try:
            meta = module.on_meta()
            d = meta.delta(torch.empty(weight.shape, device="meta")) if isinstance(meta, WeightModule) else meta.raw_delta()
        except (RuntimeError, ValueError):
            d = None
        flat_conv = d is not None and d.dim() == 2 and weight.dim() == 4 and d.shape[0] == weight.shape[0] \
            and d.shape[1] == weight[0].numel()  # LoHa/LoKr factors of a conv weight, flattened
        if d is None or not (tuple(d.shape) == tuple(weight.shape) or flat_conv):
            return f"{module.kind} tensors {shapes} do not fit the model's weight {tuple(weight.shape)}"
        dora = getattr(module, "dora_scale", None)
        if dora is not None and dora.numel() not in (weight.shape[0], weight.shape[1]):
            return f"dora_scale {tuple(dora.shape)} fits neither axis of the model's weight {tuple(weight.shape)}"
        bias = module.bias_delta()
        if bias is not None and bias.numel() != weight.shape[0]:
            return f"diff_b {tuple(bias.shape)} does not fit the model's {weight.shape[0]} outputs"
        return None

    def module(self) -> Module:
        """The file-side module over the live parameters (gradients flow through it)."""
        parts = {self.names[k]: p for k, p in self.params.items()}
        if self.alpha is not None:
            parts["alpha"] = torch.tensor(self.alpha)
        return self.cls.from_tensors(parts)

    def state(self) -> Module:
        m = self.module()
        return m.from_tensors({k: t.detach() for k, t in m.tensors().items()})

    def delta(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.module().delta(weight)

    def bias_delta(self) -> torch.Tensor | None:
        return self.module().bias_delta()


KINDS = ("lora", "loha", "lokr", "dora")  # what `imglora train --adapter` can make


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """dim = m · n with m <= n: m = `factor` when it divides dim, else the divisor nearest √dim (not above
    `factor` when one is given). LoKr splits each side of the weight so."""
    if factor > 0 and dim % factor == 0:
        return tuple(sorted((factor, dim // factor)))
    limit = dim if factor <= 0 else factor
    m = max(d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0 and d <= limit)
    return m, dim // m


def new_module(kind: str, weight: torch.Tensor, rank: int, alpha: float, init: str = "kaiming", factor: int = -1,
               full_matrix: bool = False, dtype: torch.dtype = torch.float32) -> Module:
    """A trainable module of `kind` for a base weight that adds exactly nothing yet (the initialisations
    LyCORIS uses: one factor starts at zero; DoRA's magnitude starts at the base weight's row norms)."""
    out, rest = weight.shape[0], tuple(weight.shape[1:])
    kernel = rest[1:]
    opts = dict(device=weight.device, dtype=dtype)
    if kind in ("lora", "dora"):
        pair = LowRank.new_tensors(weight, rank, init, dtype)
        dora = weight.detach().to(dtype).flatten(1).norm(dim=1).view(out, *[1] * len(rest)) if kind == "dora" else None
        return LoraModule(*pair, alpha, dora_scale=dora)
    if kind == "loha":
        fan_in = math.prod(rest)
        return LohaModule(torch.randn(out, rank, **opts) * 0.1, torch.randn(rank, fan_in, **opts),
                          torch.zeros(out, rank, **opts), torch.randn(rank, fan_in, **opts), alpha)
    if kind == "lokr":
        (out_l, out_k), (in_m, in_n) = factorization(out, factor), factorization(rest[0], factor)
        w1 = nn.init.kaiming_uniform_(torch.empty(out_l, in_m, **opts), a=math.sqrt(5))
        if full_matrix or rank >= max(out_k, in_n) / 2:  # a factored w2 would be no smaller: LyCORIS's rule
            return LokrModule(w1=w1, w2=torch.zeros(out_k, in_n, *kernel, **opts), alpha=alpha)
        w2a = nn.init.kaiming_uniform_(torch.empty(out_k, rank, **opts), a=math.sqrt(5))
        # A conv's w2_b holds the kernel flattened, (rank, in·kh·kw), as LyCORIS writes it.
        return LokrModule(w1=w1, w2a=w2a, w2b=torch.zeros(rank, in_n * math.prod(kernel), **opts), alpha=alpha)
    raise ValueError(f"unknown adapter kind {kind!r} (choose from {', '.join(KINDS)})")


def kind_for(module) -> type[Kind]:
    """The kind that holds a file module of this type: the fused pair for plain LoRA, else Dense."""
    if isinstance(module, LoraModule) and module.mid is None and module.dora_scale is None:
        return LowRank
    if isinstance(module, Module):
        return Dense
    raise TypeError(f"no adapter kind holds a {type(module).__name__}")

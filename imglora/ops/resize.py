"""Lower an adapter's rank by SVD of each module's ΔW, reporting how much of it is kept."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..lora.modules import LoraModule

from ..lora.state import Adapter


@dataclass
class Energy:
    """Squared Frobenius norm kept / total, over all modules and for the worst module."""

    kept: float
    worst: float
    worst_module: str

    def line(self) -> str:
        return f"retained energy {self.kept:.2%} overall, {self.worst:.2%} worst ({self.worst_module})"


def not_plain_lora(adapter: Adapter) -> str | None:
    """Why merge and resize cannot take this adapter (None: they can): they work on B·A, so only plain
    LoRA/LoCon modules; LoHa, LoKr, full deltas, DoRA magnitudes and Tucker cores have other forms."""
    for key, m in adapter.modules.items():
        kind = getattr(m, "kind", "lora")
        if getattr(m, "dora_scale", None) is not None:
            kind += "+dora"
        elif kind == "lora" and getattr(m, "mid", None) is not None:
            kind = "lora with a Tucker core"
        if kind != "lora":
            return f"module {key} is {kind}"
    return None


def truncate(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """The best rank-`rank` factors of B·A (Eckart-Young), without forming B·A.

    B is (out, R), A is (R, in·k·k). With B = Qb·Rb and Aᵀ = Qa·Ra, B·A = Qb·(Rb·Raᵀ)·Qaᵀ, so only the
    small R×R middle needs an SVD. Returns (B', A', kept energy, total energy) with the singular values
    split evenly between B' and A'.
    """
    Qb, Rb = torch.linalg.qr(B.double())
    Qa, Ra = torch.linalg.qr(A.double().T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)
    k = min(rank, S.numel())
    root = S[:k].sqrt()
    new_B = (Qb @ U[:, :k]) * root
    new_A = root[:, None] * (Vh[:k] @ Qa.T)
    total = float((S ** 2).sum())
    return new_B.float(), new_A.float(), float((S[:k] ** 2).sum()), total


def resize_module(m: LoraModule, rank: int) -> tuple[LoraModule, float, float]:
    conv = m.A.dim() == 4
    A = m.A.flatten(1)
    B = m.B.flatten(1) * m.scale
    new_B, new_A, kept, total = truncate(B, A, rank)
    k = new_A.shape[0]
    if conv:
        new_A = new_A.reshape(k, *m.A.shape[1:])
        new_B = new_B.reshape(m.B.shape[0], k, 1, 1)
    return LoraModule(new_A, new_B, float(k)), kept, total  # alpha = rank: the scale is folded into B


def resize(adapter: Adapter, rank: int) -> tuple[Adapter, Energy]:
    modules, kept_sum, total_sum = {}, 0.0, 0.0
    worst, worst_key = 1.0, ""
    for key, m in adapter.modules.items():
        new, kept, total = resize_module(m, rank)
        modules[key] = new
        kept_sum, total_sum = kept_sum + kept, total_sum + total
        ratio = kept / total if total else 1.0
        if ratio < worst:
            worst, worst_key = ratio, key
    energy = Energy(kept_sum / total_sum if total_sum else 1.0, worst, worst_key or "-")
    return Adapter(modules, dict(adapter.metadata), adapter.arch), energy

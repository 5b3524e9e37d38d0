"""Blend several adapters into one file: exact concatenation, or SVD down to a chosen rank."""

from __future__ import annotations

import torch

from ..lora.state import Adapter, LoraModule
from .resize import Energy, resize


def concatenate(parts: list[tuple[Adapter, float]]) -> Adapter:
    """One adapter whose ΔW is exactly Σ wᵢ·ΔWᵢ for every module.

    Stacking the A's along the rank axis and the weighted, scaled B's beside each other gives
    B_cat·A_cat = Σ wᵢ·(alphaᵢ/rᵢ)·Bᵢ·Aᵢ; alpha = total rank makes the file's own scale 1.
    """
    archs = {a.arch for a, _ in parts} - {"unknown"}
    if len(archs) > 1:
        raise ValueError(f"the adapters are for different base models ({', '.join(sorted(archs))})")
    keys: list[str] = []
    for adapter, _ in parts:
        keys += [k for k in adapter.modules if k not in keys]
    modules = {}
    for key in keys:
        As, Bs = [], []
        for adapter, weight in parts:
            m = adapter.modules.get(key)
            if m is None or weight == 0:
                continue
            if As and m.A.shape[1:] != As[0].shape[1:]:
                raise ValueError(f"module {key}: the adapters have different shapes and cannot be blended")
            As.append(m.A.float())
            Bs.append(m.B.float() * (weight * m.scale))
        if As:
            A, B = torch.cat(As, 0), torch.cat(Bs, 1)
            modules[key] = LoraModule(A, B, float(A.shape[0]))
    arch = next((a.arch for a, _ in parts if a.arch != "unknown"), "unknown")
    return Adapter(modules, {}, arch)


def merge(parts: list[tuple[Adapter, float]], rank: int | None = None) -> tuple[Adapter, Energy | None]:
    """Concatenate; with `rank`, compress each module to that rank by SVD and report the kept energy."""
    merged = concatenate(parts)
    if rank is None:
        return merged, None
    return resize(merged, rank)

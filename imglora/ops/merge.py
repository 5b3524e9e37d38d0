"""Blend several adapters into one file: exact concatenation, or SVD down to a chosen rank."""

from __future__ import annotations

import torch

from ..lora.blocks import block_of
from ..lora.modules import FullModule, LoraModule, NormModule
from ..lora.state import Adapter, Blend
from .resize import Energy, resize


def blend_parts(adapter: Adapter, blend: Blend, name: str, layers_per_block: int = 2) -> list[tuple[Adapter, float]]:
    """An adapter's share of a blend as (part, weight) pairs for the merges below: its modules grouped by the
    weight the blend gives them (the UNet and text-encoder weights, times block weights). A schedule changes
    weights during generation, which no single file can hold: ValueError."""
    if blend.schedules.get(name):
        raise ValueError(f"{name} has a step schedule (start/stop/keyframes), which cannot be merged into a file "
                         "or baked into a model; drop it, or use it at generation time")
    groups: dict[float, dict] = {}
    for key, m in adapter.modules.items():
        groups.setdefault(blend.layer_weight(name, key, block_of(key, layers_per_block)), {})[key] = m
    return [(Adapter(modules, {}, adapter.arch), w) for w, modules in groups.items()]


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


def merge_kinds(parts: list[tuple[Adapter, float]], base_weights: dict[str, torch.Tensor],
                rank: int | None = None) -> tuple[Adapter, Energy | None]:
    """Blend adapters of any kinds. Modules where every part is a plain LoRA are concatenated exactly
    (then cut to `rank` by SVD, if given); elsewhere the blend is Σ wᵢ·ΔWᵢ on the model's weights
    (DoRA's ΔW depends on them), written as a full delta (exact) or, with `rank`, a LoRA by SVD."""
    from .extract import _energy, lora_from_delta

    plain = lambda m: isinstance(m, LoraModule) and m.mid is None and m.dora_scale is None  # noqa: E731
    keys = list(dict.fromkeys(k for a, _ in parts for k in a.modules))
    lora_keys = [k for k in keys if all(plain(a.modules[k]) for a, _ in parts if k in a.modules)]
    lora_parts = [(Adapter({k: m for k, m in a.modules.items() if k in lora_keys}, {}, a.arch), w) for a, w in parts]
    merged = concatenate(lora_parts)
    energy = None
    if rank is not None and merged.modules:
        merged, energy = resize(merged, rank)
    modules, kept = dict(merged.modules), {}
    for key in keys:
        if key in lora_keys:
            continue
        if key not in base_weights:
            raise ValueError(f"module {key} does not exist in this model")
        w0 = base_weights[key]
        delta = sum(w * a.modules[key].delta(w0).reshape(w0.shape) for a, w in parts if key in a.modules)
        if w0.dim() == 1:  # a norm layer: its weight and bias changes add up as they are
            biases = [w * a.modules[key].bias_delta() for a, w in parts
                      if key in a.modules and a.modules[key].bias_delta() is not None]
            modules[key] = NormModule(delta.float(), sum(biases) if biases else None)
        elif rank is None:
            modules[key] = FullModule(delta.float())
        else:
            modules[key], *kept[key] = lora_from_delta(delta, rank)
    if kept:  # the LoRA part and the dense part each report their share; overall, the lower one is a bound
        dense = _energy(kept)
        energy = dense if energy is None else Energy(min(energy.kept, dense.kept), min(energy.worst, dense.worst),
                                                     dense.worst_module if dense.worst < energy.worst
                                                     else energy.worst_module)
    return Adapter(modules, {}, merged.arch), energy

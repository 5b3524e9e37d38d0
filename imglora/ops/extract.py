"""Plain LoRA from anything that has a ΔW: another kind of adapter (`imglora convert --to lora`) or the
difference of two checkpoints (`imglora extract`, as kohya's extract_lora_from_models.py). Each ΔW is cut
to the best rank-r factors by SVD (Eckart-Young), and the share of its energy kept is reported."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..lora.modules import LoraModule

from ..lora.state import Adapter
from .resize import Energy


def lora_from_delta(delta: torch.Tensor, rank: int) -> tuple[LoraModule, float, float]:
    """(the rank-`rank` LoRA nearest ΔW, energy kept, total energy); ΔW is (out, in) or (out, in, kh, kw)."""
    D = delta.double().flatten(1)
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    k = min(rank, S.numel())
    root = S[:k].sqrt()
    B, A = (U[:, :k] * root).float(), (root[:, None] * Vh[:k]).float()
    if delta.dim() == 4:
        A, B = A.reshape(k, *delta.shape[1:]), B.reshape(delta.shape[0], k, 1, 1)
    return LoraModule(A, B, float(k)), float((S[:k] ** 2).sum()), float((S ** 2).sum())


def _energy(kept: dict[str, tuple[float, float]]) -> Energy:
    total = sum(t for _, t in kept.values())
    ratios = {k: (a / t if t else 1.0) for k, (a, t) in kept.items()}
    worst = min(ratios, key=ratios.get) if ratios else "-"
    return Energy(sum(a for a, _ in kept.values()) / total if total else 1.0, ratios.get(worst, 1.0), worst)


def to_lora(adapter: Adapter, rank: int, base_weights: dict[str, torch.Tensor],
            progress: bool = False) -> tuple[Adapter, Energy, list[str]]:
    """Every module as a plain LoRA of at most `rank`: (adapter, energy kept, notes). A plain LoRA module
    of rank <= `rank` is kept as it is (exactly). base_weights {module key: the model's weight} give each
    ΔW its shape (LoHa and LoKr store a conv's kernel flattened) and DoRA its norm; a full delta's bias
    change cannot be a LoRA and is left out (a note)."""
    modules, kept, notes = {}, {}, []
    for key, m in tqdm(adapter.modules.items(), desc="to LoRA", unit="module", disable=not progress):
        if isinstance(m, LoraModule) and m.mid is None and m.dora_scale is None and m.rank <= rank:
            modules[key] = m
            continue
        if key not in base_weights:
            raise ValueError(f"module {key} does not exist in this model")
        weight = base_weights[key]
        if m.kind == "norm":
            notes.append(f"{key}: a norm layer's change (w_norm/b_norm) cannot be a LoRA and is left out")
            continue
        try:
            delta = m.delta(weight).reshape(weight.shape)
        except RuntimeError:  # the ΔW does not have the weight's size
            raise ValueError(f"module {key} does not fit the model's weight {tuple(weight.shape)}: the adapter "
                             "was made for another model") from None
        if m.bias_delta() is not None:
            notes.append(f"{key}: its bias change (diff_b) cannot be a LoRA and is left out")
        modules[key], *kept[key] = lora_from_delta(delta, rank)
    return Adapter(modules, dict(adapter.metadata), adapter.arch), _energy(kept), notes


@torch.no_grad()
def extract(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], rank: int, conv_rank: int | None = None,
            min_change: float = 1e-6, progress: bool = True) -> tuple[Adapter, Energy]:
    """A LoRA of the difference tuned - base over the given weights ({module key: weight}, the same keys in
    both); weights that did not change (relative change below min_change) are left out. conv_rank is the
    rank of k×k convolutions (default: rank)."""
    modules, kept = {}, {}
    for key in tqdm(sorted(base), desc="extracting", unit="module", disable=not progress):
        w0, w1 = base[key].float(), tuned[key].float()
        delta = w1 - w0
        if delta.norm() <= min_change * max(w0.norm(), 1e-12):
            continue
        r = (conv_rank or rank) if delta.dim() == 4 and delta.shape[-1] > 1 else rank
        modules[key], *kept[key] = lora_from_delta(delta, r)
    return Adapter(modules), _energy(kept)


def weights_of(pipe, keys) -> dict[str, torch.Tensor]:
    """{module key: the pipeline's weight} for `component.path` keys (the base under any adapter wrapper)."""
    from ..lora.inject import find
    from ..lora.state import split_component

    out = {}
    for key in keys:
        component, path = split_component(key)
        root = getattr(pipe, component, None)
        if root is None:
            continue
        try:
            module = find(root, path)
        except AttributeError:
            continue
        out[key] = getattr(module, "base", module).weight.detach()
    return out

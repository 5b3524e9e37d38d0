"""How adapters interact when stacked: per LBW block, each adapter's ΔW norm, the cosine overlap between
adapters, and the top singular values (a rank-1 spike, one direction holding most of a module's update, is
what makes two LoRAs fight when stacked).

Norms and overlaps are Frobenius over the block's modules: ‖ΔW‖ = √Σ‖ΔWₘ‖², cos(a, b) = Σ⟨ΔWₘᵃ, ΔWₘᵇ⟩ /
(‖ΔWᵃ‖·‖ΔWᵇ‖) over the modules both adapt. Kinds whose ΔW depends on the base weight (DoRA, OFT, (IA)³, GLoRA)
need `base_weights`; without them those modules are left out and said so.
"""

from __future__ import annotations

import itertools
import math

import torch

from ..lora.blocks import BLOCKS26, block_of
from ..lora.modules import LoraModule, WeightModule
from ..lora.state import Adapter

TOP = 3  # singular values reported per block
OVERLAP = 0.5  # |cos| from which two adapters are said to overlap strongly in a block


def _delta(m, weight: torch.Tensor | None) -> torch.Tensor | None:
    needs = isinstance(m, WeightModule) or getattr(m, "dora_scale", None) is not None
    if needs and weight is None:
        return None
    d = m.delta(weight.float() if weight is not None else None).float()
    return d.flatten(1) if d.dim() > 1 else d.reshape(1, -1)


def _top_singular(m, d: torch.Tensor) -> list[float]:
    """The largest singular values of one module's ΔW; a plain LoRA's from its r×r core (exact and cheap)."""
    if isinstance(m, LoraModule) and m.mid is None and m.dora_scale is None:
        _, rb = torch.linalg.qr(m.B.float().flatten(1))
        _, ra = torch.linalg.qr(m.A.float().flatten(1).T)
        return (torch.linalg.svdvals(m.scale * rb @ ra.T)[:TOP]).tolist()
    return torch.linalg.svdvals(d)[:TOP].tolist() if min(d.shape) <= 2048 else \
        torch.svd_lowrank(d, q=TOP + 4, niter=2)[1][:TOP].tolist()


def report(adapters: dict[str, Adapter], layers_per_block: int = 2,
           base_weights: dict[str, torch.Tensor] | None = None) -> dict:
    """{"blocks": {block: {"norm": {name: x}, "top": {name: [σ…]}, "spike": {name: σ₁/‖ΔW‖}, "cos": {"a|b": c}}},
    "overall": {"norm": …, "cos": …}, "skipped": {name: n modules left out}, "warnings": [lines]}."""
    names = list(adapters)
    sq = {b: dict.fromkeys(names, 0.0) for b in BLOCKS26 + ("other",)}
    dots = {b: {} for b in sq}
    top: dict[str, dict[str, list]] = {b: {} for b in sq}
    skipped = dict.fromkeys(names, 0)
    keys = list(dict.fromkeys(k for a in adapters.values() for k in a.modules))
    for key in keys:
        block = block_of(key, layers_per_block) or "other"
        weight = (base_weights or {}).get(key)
        deltas = {}
        for n in names:
            m = adapters[n].modules.get(key)
            if m is None:
                continue
            d = _delta(m, weight)
            if d is None:
                skipped[n] += 1
                continue
            deltas[n] = d
            sq[block][n] += float(d.square().sum())
            sv = _top_singular(m, d)
            if sv and sv[0] > (top[block].get(n) or [0.0])[0]:
                top[block][n] = sv + [float(d.norm())]  # the module with the biggest spike; its norm last
        for a, b in itertools.combinations(deltas, 2):
            dots[block][f"{a}|{b}"] = dots[block].get(f"{a}|{b}", 0.0) + float((deltas[a] * deltas[b]).sum())
    blocks, warnings = {}, []
    for block in sq:
        norms = {n: math.sqrt(v) for n, v in sq[block].items() if v}
        if not norms:
            continue
        cos = {pair: d / (norms[pair.split("|")[0]] * norms[pair.split("|")[1]])
               for pair, d in dots[block].items() if all(p in norms for p in pair.split("|"))}
        blocks[block] = {"norm": norms, "top": {n: v[:-1] for n, v in top[block].items()},
                         "spike": {n: v[0] / v[-1] if v[-1] else 0.0 for n, v in top[block].items()}, "cos": cos}
        for pair, c in cos.items():
            if abs(c) >= OVERLAP:
                a, b = pair.split("|")
                warnings.append(f"{a} and {b} overlap strongly in {block} (cosine {c:+.2f}): stacked, they push the "
                                "same directions; lower one of them there (block weights) or use a normalised blend")
    total = {n: math.sqrt(sum(sq[b][n] for b in sq)) for n in names}
    overall = {pair: sum(dots[b].get(pair, 0.0) for b in dots) / (total[pair.split("|")[0]] * total[pair.split("|")[1]])
               for pair in (f"{a}|{b}" for a, b in itertools.combinations(names, 2))
               if total[pair.split("|")[0]] and total[pair.split("|")[1]]}
    for n, k in skipped.items():
        if k:
            warnings.append(f"{n}: {k} modules (DoRA, OFT, (IA)³ or GLoRA) left out: their ΔW needs the base model "
                            "(pass --model)")
    return {"blocks": blocks, "overall": {"norm": total, "cos": overall}, "skipped": skipped, "warnings": warnings}


def render(result: dict) -> str:
    """The report as a table: one row per block with each adapter's norm and top singular value (and its
    share of the module's norm, the spike), then each pair's cosine."""
    names = list(result["overall"]["norm"])
    pairs = list(result["overall"]["cos"])
    head = ["block"] + [f"‖{n}‖ σ₁ (share)" for n in names] + [f"cos {p.replace('|', '·')}" for p in pairs]
    rows = [head]
    for block, r in result["blocks"].items():
        cells = [block]
        for n in names:
            if n in r["norm"]:
                sv = r["top"].get(n) or [0.0]
                cells.append(f"{r['norm'][n]:.3g} {sv[0]:.3g} ({r['spike'].get(n, 0):.0%})")
            else:
                cells.append("-")
        cells += [f"{r['cos'][p]:+.2f}" if p in r["cos"] else "-" for p in pairs]
        rows.append(cells)
    rows.append(["all"] + [f"{result['overall']['norm'][n]:.3g}" for n in names]
                + [f"{result['overall']['cos'][p]:+.2f}" for p in pairs])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines + [f"warning: {w}" for w in result["warnings"]])

"""Optimizers and learning-rate schedules."""

from __future__ import annotations

import math

import torch

from ..errors import ImgloraError


def make_optimizer(name: str, groups: list[dict], weight_decay: float, device_type: str):
    if name == "adamw":
        # The fused kernel exists for CUDA (and CPU in recent torch); it is the fastest AdamW there is.
        fused = device_type == "cuda"
        return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=fused or None)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImgloraError("--optimizer adamw8bit needs bitsandbytes", "pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(groups, weight_decay=weight_decay)
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ImgloraError("--optimizer prodigy needs prodigyopt", "pip install prodigyopt") from None
        # Prodigy finds its own step size; lr is a multiplier and 1.0 is the documented setting.
        return Prodigy(groups, weight_decay=weight_decay)
    raise ImgloraError(f"unknown optimizer {name!r}")


def make_schedule(optimizer, kind: str, warmup: int, total: int, floor: float = 0.0):
    """constant, cosine or linear decay to `floor` (a fraction of the rate) over `total` steps, after a
    linear warm-up."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
        return floor + (1.0 - floor) * decay

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

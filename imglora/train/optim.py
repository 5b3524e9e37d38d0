"""Optimizers, their parameter groups (LoRA+) and learning-rate schedules."""

from __future__ import annotations

import math

import torch

from ..errors import ImgloraError

# The "up" factors LoRA+ speeds up, by their names in Adapters.named_parameters: B of the fused pair and
# lora_up of DoRA, the tensors kohya's and LyCORIS's prepare_optimizer_params match with "lora_up".
UP_FACTORS = (".B", ".lora_up_weight")


def up_factors(named: dict[str, torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """The up factors among an adapter's tensors (Adapters.named_parameters)."""
    return [p for k, p in named.items() if k.endswith(UP_FACTORS)]


def param_groups(unet: list, text_encoder: list, lr: float, te_lr: float, loraplus_ratio: float | None = None,
                 up: list = ()) -> list[dict]:
    """The optimizer's groups, each with a "name": the UNet's trained tensors ("unet") and the text encoders'
    ("text_encoder"). With LoRA+ (Hayou et al. 2024) the up factors among them (`up`) get groups of their own,
    "unet_plus" and "text_encoder_plus", at `loraplus_ratio` times the rate; the schedule scales every group
    by the same factor, so the ratio holds at every step."""
    plus = {id(p) for p in up} if loraplus_ratio else set()
    groups = []
    for name, params, rate in (("unet", unet, lr), ("text_encoder", text_encoder, te_lr)):
        rest = [p for p in params if id(p) not in plus]
        fast = [p for p in params if id(p) in plus]
        if rest:
            groups.append({"name": name, "params": rest, "lr": rate})
        if fast:
            groups.append({"name": f"{name}_plus", "params": fast, "lr": rate * loraplus_ratio})
    return groups


def make_optimizer(name: str, groups: list[dict], weight_decay: float, device_type: str, warmup_steps: int = 0):
    """warmup_steps: only schedulefree uses it (its own warm-up; the schedule must then stay constant)."""
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
    if name == "adafactor":
        # transformers' Adafactor with kohya's recommended settings: the given rate as is (no relative step,
        # no scaling by the parameter's RMS, no warm-up of its own), so --lr and the schedule mean what they
        # say. torch.optim.Adafactor always scales the step by the parameter's RMS and min(lr, 1/sqrt(t)): a
        # LoRA B starts at zero, so it would barely move at first.
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=groups[0]["lr"], relative_step=False, scale_parameter=False, warmup_init=False,
                         weight_decay=weight_decay)
    if name == "schedulefree":
        try:
            from schedulefree import AdamWScheduleFree
        except ImportError:
            raise ImgloraError("--optimizer schedulefree needs schedulefree", "pip install schedulefree") from None
        return AdamWScheduleFree(groups, lr=groups[0]["lr"], weight_decay=weight_decay, warmup_steps=warmup_steps)
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

"""An exponential moving average of the adapter weights (--ema), and the swap of the weights a run ships
(the EMA, or a schedule-free optimizer's average) in for samples, validation and the final file.

After every `every`-th optimizer step past `start_step`, ema = decay·ema + (1-decay)·w, with a constant
decay (diffusers' EMAModel instead ramps it up as (1+t)/(10+t)); up to `start_step` it simply follows the
weights (as diffusers' update_after_step: an average of the first, far-off steps would only drag it back).
It is kept in float32 on the weights' device and saved in every checkpoint, so a resumed run continues it
exactly.
"""

from __future__ import annotations

import contextlib

import torch


class EMA:
    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float, start_step: int = 0, every: int = 1):
        self.params = params
        self.decay, self.start_step, self.every = decay, start_step, every
        self.shadow = {k: p.detach().float().clone() for k, p in params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step number `step` (1 for the first)."""
        names = list(self.params)
        shadow, live = [self.shadow[k] for k in names], [self.params[k].detach().float() for k in names]
        if step <= self.start_step:
            torch._foreach_copy_(shadow, live)
        elif (step - self.start_step) % self.every == 0:
            torch._foreach_lerp_(shadow, live, 1.0 - self.decay)  # ema + (1-d)(w - ema) = d·ema + (1-d)·w

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for k, p in self.params.items():
            p.copy_(self.shadow[k])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: t.detach().cpu().contiguous() for k, t in self.shadow.items()}

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(tensors)
        if missing:
            raise KeyError(f"the EMA lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")
        for k, t in self.shadow.items():
            t.copy_(tensors[k])


@contextlib.contextmanager
def shipped_weights(params: dict[str, torch.nn.Parameter], ema: EMA | None = None, schedule_free=None,
                    changed=lambda: None):
    """Inside: the adapter as it is shipped, the EMA or (schedule_free: the optimizer) the schedule-free
    average x, instead of the weights being trained. Afterwards the trained weights come back bit for bit:
    copied back, not recomputed, because schedule-free's eval()/train() round trip is not exact in floating
    point and a resumed run must see exactly the weights an uninterrupted one trains on. `changed` is
    called after each swap (the adapters' inference caches)."""
    if ema is None and schedule_free is None:
        yield
        return
    backup = {k: p.detach().clone() for k, p in params.items()}
    try:
        if schedule_free is not None:
            schedule_free.eval()
        if ema is not None:
            ema.copy_to_params()
        changed()
        yield
    finally:
        with torch.no_grad():
            if schedule_free is not None:
                schedule_free.train()  # back to train mode; its recomputed y is replaced by the exact one
            for k, p in params.items():
                p.copy_(backup[k])
        changed()

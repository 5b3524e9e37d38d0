"""A frozen Linear or Conv2d with any number of named adapters, applied in one fused step.

Each adapter's tensors are a kind object (lora/kinds.py); the layer owns the blend: weights, enable,
per-sample weights, merging, and the caches those need.

y = base(x) + B_cat · diag(s) · A_cat · x, where A_cat stacks every active adapter's A along the
rank axis, B_cat their B's, and s holds weight·alpha/rank for each rank column. However many
adapters are active, that is one extra pair of matmuls (convolutions for Conv2d). With per-sample
weights, s becomes one row per sample, so one batch can render several blends at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kinds import Kind, LowRank, kind_for


class _Named(nn.ModuleDict):
    """Kinds by adapter name, prefixed inside so that any name ('train', 'keys') is safe as an attribute."""

    def __getitem__(self, name):
        return super().__getitem__("k_" + name)

    def __setitem__(self, name, value):
        super().__setitem__("k_" + name, value)

    def __delitem__(self, name):
        super().__delitem__("k_" + name)

    def __contains__(self, name):
        return super().__contains__("k_" + name)

    def keys(self):
        return [k[2:] for k in super().keys()]


class LoraLayer(nn.Module):
    def __init__(self, base: nn.Linear | nn.Conv2d):
        super().__init__()
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            raise ValueError("LoRA on grouped convolutions is not supported")
        self.base = base
        self.is_conv = isinstance(base, nn.Conv2d)
        self.adapters = _Named()  # name -> its Kind (lora/kinds.py): the adapter's own tensors
        self.weights: dict[str, float] = {}  # the user's blend multiplier per adapter
        self.enabled: dict[str, bool] = {}
        # (n_samples, n_active) multipliers; the batch is tiled over it (CFG doubles the batch).
        self.sample_weights: torch.Tensor | None = None
        self.sample_names: list[str] = []
        self._backup: torch.Tensor | None = None  # the exact base weight while merged
        self._cache: tuple | None = None

    def __getattr__(self, name: str):
        # Code that inspects the wrapped layer (weight.dtype, in_features, ...) still works.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base"), name)

    # -- adapters -------------------------------------------------------------------------------
    def add(self, name: str, rank: int, alpha: float, init: str = "kaiming", dropout: float = 0.0,
            dtype: torch.dtype = torch.float32) -> None:
        """A new trainable LoRA pair that starts exactly at the base."""
        self._store(name, LowRank.new(self.base, rank, alpha, init=init, dropout=dropout, dtype=dtype))

    def load(self, name: str, module, dtype: torch.dtype = torch.float32) -> None:
        """Attach a file module's trained weights (frozen); Adapters has checked that it fits."""
        self._store(name, kind_for(module).load(self.base, module, dtype=dtype))

    def _store(self, name: str, kind: Kind) -> None:
        self.adapters[name] = kind
        self.weights.setdefault(name, 1.0)
        self.enabled[name] = True
        self.changed()

    def remove(self, name: str) -> None:
        if name in self.adapters:
            del self.adapters[name]
        for d in (self.weights, self.enabled):
            d.pop(name, None)
        self.changed()

    def module(self, name: str):
        """The adapter's detached file-side module (lora/state.py)."""
        return self.adapters[name].state()

    def active(self) -> list[str]:
        if self.sample_weights is not None:
            return self.sample_names
        return [n for n in self.adapters.keys() if self.enabled[n] and self.weights[n] != 0.0]

    def changed(self) -> None:
        """Call after changing adapter tensors in place (an optimizer step): inference caches rebuild."""
        self._cache = None

    # The blend: only these write weights, enabled and the per-sample table, so the caches stay right.
    def set_weight(self, name: str, weight: float) -> None:
        self.weights[name] = float(weight)
        self.changed()

    def enable(self, name: str, on: bool = True) -> None:
        self.enabled[name] = bool(on)
        self.changed()

    def set_sample_weights(self, names: list[str], table: torch.Tensor | None) -> None:
        """table: (n_samples, len(names)) multipliers, one row per sample; None clears it."""
        self.sample_names, self.sample_weights = (list(names), table) if table is not None else ([], None)
        self.changed()

    # -- math -----------------------------------------------------------------------------------
    def delta(self, names: list[str] | None = None) -> torch.Tensor:
        """Σ weight·(alpha/rank)·B·A over the active adapters, in float32, shaped like the base weight."""
        total = torch.zeros_like(self.base.weight, dtype=torch.float32)
        for n in self.active() if names is None else names:
            total += self.weights[n] * self.adapters[n].delta().to(total.device)
        return total

    def _scales(self, names: list[str], device) -> torch.Tensor:
        """weight·alpha/rank for every rank column of the stack, shape (R,)."""
        return torch.cat([torch.full((self.adapters[n].rank,), self.weights[n] * self.adapters[n].alpha
                                     / self.adapters[n].rank, device=device) for n in names])

    def _stack(self, names: list[str]):
        pairs = [self.adapters[n] for n in names]
        if len(pairs) == 1:
            return pairs[0].A, pairs[0].B
        return torch.cat([k.A for k in pairs], 0), torch.cat([k.B for k in pairs], 1)

    def _sample_columns(self, names: list[str], device) -> torch.Tensor:
        """(n_samples, R): each sample's weight·alpha/rank for every rank column of the stack."""
        ranks = torch.tensor([self.adapters[m].rank for m in names])
        per_col = torch.repeat_interleave(torch.tensor([self.adapters[m].alpha for m in names]) / ranks, ranks)
        return (torch.repeat_interleave(self.sample_weights, ranks, dim=1) * per_col).to(device)

    def _inference_plan(self, x: torch.Tensor):
        """Everything a no-grad forward needs, built once per change: (names, A, B, sample columns).

        Without per-sample weights the scales are folded into B, so a forward is exactly two extra
        matmuls; the cache is keyed by nothing that costs a loop over adapters per call."""
        key = (x.dtype, x.device)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        with torch.no_grad():
            names = self.active()
            plan = (names, None, None, None)
            if names:
                A, B = self._stack(names)
                cols = None
                if self.sample_weights is None:
                    s = self._scales(names, A.device)
                    B = B * (s.view(1, -1, 1, 1) if self.is_conv else s)
                else:
                    cols = self._sample_columns(names, x.device).to(x.dtype)
                plan = (names, A.to(x.dtype), B.to(x.dtype), cols)
        self._cache = (key, plan)
        return plan

    def _down(self, x, A):
        if self.is_conv:
            b = self.base
            return F.conv2d(x, A, None, b.stride, b.padding, b.dilation)
        return F.linear(x, A)

    def _up(self, h, B):
        return F.conv2d(h, B) if self.is_conv else F.linear(h, B)

    def _apply_columns(self, h: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Scale h's rank columns per sample; the batch is the samples tiled (CFG doubles it)."""
        n = cols.shape[0]
        if h.shape[0] % n:
            raise ValueError(f"batch of {h.shape[0]} is not a multiple of the {n} per-sample weights")
        cols = cols.repeat(h.shape[0] // n, 1)
        return h * (cols.view(*cols.shape, 1, 1) if self.is_conv else cols.view(cols.shape[0], *([1] * (h.dim() - 2)), -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self._backup is not None:  # merged: the base weight already holds the blend
            return out
        if not (torch.is_grad_enabled() and any(p.requires_grad for p in self.adapters.parameters())):
            names, A, B, cols = self._inference_plan(x)
            if not names:
                return out
            h = self._down(x, A)
            if cols is not None:
                h = self._apply_columns(h, cols)
            return out + self._up(h, B)
        # Training: autograd through the stacked matmul (or per adapter, when each has its own dropout).
        names = self.active()
        if not names:
            return out
        if self.training and any(self.adapters[n].dropout > 0 for n in names):
            for n in names:
                k = self.adapters[n]
                h = self._down(F.dropout(x.to(k.A.dtype), k.dropout), k.A)
                out = out + (self._up(h, k.B) * (self.weights[n] * k.alpha / k.rank)).to(out.dtype)
            return out
        A, B = self._stack(names)
        # Under autocast the matmul runs in half precision anyway: casting x up to float32 first
        # would only add a copy of every input (and keep it for backward).
        h = self._down(x if torch.is_autocast_enabled(x.device.type) else x.to(A.dtype), A)
        if self.sample_weights is not None:
            h = self._apply_columns(h, self._sample_columns(names, x.device).to(h.dtype))
        else:
            s = self._scales(names, x.device).to(h.dtype)
            h = h * (s.view(1, -1, 1, 1) if self.is_conv else s)
        return out + self._up(h, B).to(out.dtype)

    # -- merging --------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active blend into the base weight (again, from the exact original, if merged).

        W = W0 + B_cat·diag(s)·A_cat in float32: one matmul for all adapters, so a weight change in
        merged mode costs a few kernels per layer."""
        if self.sample_weights is not None:
            raise ValueError("per-sample weights cannot be merged into the base weights")
        w = self.base.weight
        if not w.is_floating_point() or type(w.data) not in (torch.Tensor, nn.Parameter):
            raise ValueError("a quantized base weight cannot take a merged blend; use the blend at run time")
        if self._backup is None:
            self._backup = w.detach().clone()
        names = self.active()
        if not names:
            w.copy_(self._backup)
            return
        A, B = self._stack(names)
        B = B.float().flatten(1) * self._scales(names, B.device)
        merged = torch.addmm(self._backup.float().flatten(1), B, A.float().flatten(1))
        w.copy_(merged.view_as(w))

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the bit-identical original base weight."""
        if self._backup is not None:
            self.base.weight.copy_(self._backup)
            self._backup = None

    @property
    def merged(self) -> bool:
        return self._backup is not None

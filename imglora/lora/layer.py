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

from .kinds import Dense, Kind, LowRank, kind_for, new_module


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
        self._backup: torch.Tensor | None = None  # the exact base weight (and bias) while merged
        self._bias_backup: torch.Tensor | None = None
        self._cache: tuple | None = None
        self._stacked_ab: tuple | None = None  # (key, (A_cat, B_cat)): kept across weight changes (schedules)
        self._deltas: dict[tuple, tuple] = {}  # dense kinds' (ΔW, Δbias) by (name, dtype, device)

    def __getattr__(self, name: str):
        # Code that inspects the wrapped layer (weight.dtype, in_features, ...) still works.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base"), name)

    # -- adapters -------------------------------------------------------------------------------
    def add(self, name: str, rank: int, alpha: float, init: str = "kaiming", dropout: float = 0.0,
            dtype: torch.dtype = torch.float32, kind: str = "lora", **options) -> None:
        """A new trainable adapter of `kind` (lora, loha, lokr, dora) that starts exactly at the base.
        options: LoKr's factor and full_matrix."""
        if kind == "lora":
            self._store(name, LowRank.new(self.base, rank, alpha, init=init, dropout=dropout, dtype=dtype))
        else:
            module = new_module(kind, self.base.weight, rank, alpha, init=init, dtype=dtype, **options)
            self._store(name, Dense(module, trainable=True))

    def load(self, name: str, module, dtype: torch.dtype = torch.float32) -> None:
        """Attach a file module's trained weights (frozen); Adapters has checked that it fits."""
        self._store(name, kind_for(module).load(self.base, module, dtype=dtype))

    def _store(self, name: str, kind: Kind) -> None:
        self.adapters[name] = kind
        self.weights.setdefault(name, 1.0)
        self.enabled[name] = True
        self._forget(name)

    def remove(self, name: str) -> None:
        if name in self.adapters:
            del self.adapters[name]
        for d in (self.weights, self.enabled):
            d.pop(name, None)
        self._forget(name)

    def _forget(self, name: str) -> None:
        """Drop what is cached for one adapter; the others' dense ΔW stay."""
        self._deltas = {k: v for k, v in self._deltas.items() if k[0] != name}
        self._cache = self._stacked_ab = None

    def module(self, name: str):
        """The adapter's detached file-side module (lora/modules.py)."""
        return self.adapters[name].state()

    def active(self) -> list[str]:
        if self.sample_weights is not None:
            return self.sample_names
        return [n for n in self.adapters.keys() if self.enabled[n] and self.weights[n] != 0.0]

    def changed(self) -> None:
        """Call after changing adapter tensors in place (an optimizer step): inference caches rebuild."""
        self._cache = self._stacked_ab = None
        self._deltas = {}

    def _blend_changed(self) -> None:
        """A weight, enable or per-sample change: the plan rebuilds; the dense ΔW stay (same tensors)."""
        self._cache = None

    # The blend: only these write weights, enabled and the per-sample table, so the caches stay right.
    def set_weight(self, name: str, weight: float) -> None:
        self.weights[name] = float(weight)
        self._blend_changed()

    def enable(self, name: str, on: bool = True) -> None:
        self.enabled[name] = bool(on)
        self._blend_changed()

    def set_sample_weights(self, names: list[str], table: torch.Tensor | None) -> None:
        """table: (n_samples, len(names)) multipliers, one row per sample; None clears it."""
        self.sample_names, self.sample_weights = (list(names), table) if table is not None else ([], None)
        self._blend_changed()

    # -- math -----------------------------------------------------------------------------------
    def _base_weight(self) -> torch.Tensor:
        """The original base weight (DoRA normalises against it), also while merged."""
        return self._backup if self._backup is not None else self.base.weight

    def delta(self, names: list[str] | None = None) -> torch.Tensor:
        """Σ weight·ΔW over the active adapters, in float32, shaped like the base weight."""
        w0 = self._base_weight()
        total = torch.zeros_like(w0, dtype=torch.float32)
        for n in self.active() if names is None else names:
            total += self.weights[n] * self.adapters[n].delta(w0).to(total.device)
        return total

    def norm_factor(self, weights: dict[str, float]) -> float:
        """min(1, max ‖wᵢ·ΔWᵢ‖ / ‖Σ wᵢ·ΔWᵢ‖): what keeps this layer's summed update within the norm of its
        largest single update (a normalised blend). Built from the ΔW at weight 1, once per blend change."""
        w0 = self._base_weight()
        total, largest = torch.zeros_like(w0, dtype=torch.float32), 0.0
        for n, w in weights.items():
            d = w * self.adapters[n].delta(w0).to(total.device)
            largest = max(largest, float(d.norm()))
            total += d
        norm = float(total.norm())
        return 1.0 if norm <= largest or norm == 0 else largest / norm

    def _split(self, names: list[str]) -> tuple[list[str], list[str]]:
        """(fused low-rank pairs, dense kinds) among names, in order."""
        return [n for n in names if self.adapters[n].fused], [n for n in names if not self.adapters[n].fused]

    def _scales(self, names: list[str], device) -> torch.Tensor:
        """weight·alpha/rank for every rank column of the stack, shape (R,)."""
        return torch.cat([torch.full((self.adapters[n].rank,), self.weights[n] * self.adapters[n].alpha
                                     / self.adapters[n].rank, device=device) for n in names])

    def _stack(self, names: list[str]):
        pairs = [self.adapters[n] for n in names]
        if len(pairs) == 1:
            return pairs[0].A, pairs[0].B
        return torch.cat([k.A for k in pairs], 0), torch.cat([k.B for k in pairs], 1)

    def _sample_table(self, names: list[str]) -> torch.Tensor:
        """(n_samples, len(names)): the per-sample weights of these adapters."""
        return self.sample_weights[:, [self.sample_names.index(n) for n in names]]

    def _sample_columns(self, names: list[str], device) -> torch.Tensor:
        """(n_samples, R): each sample's weight·alpha/rank for every rank column of the stack."""
        ranks = torch.tensor([self.adapters[m].rank for m in names])
        per_col = torch.repeat_interleave(torch.tensor([self.adapters[m].alpha for m in names]) / ranks, ranks)
        return (torch.repeat_interleave(self._sample_table(names), ranks, dim=1) * per_col).to(device)

    def _dense_delta(self, name: str, dtype, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A dense adapter's (ΔW, Δbias) at weight 1, built once and kept until its tensors change."""
        key = (name, dtype, device)
        if key not in self._deltas:
            kind = self.adapters[name]
            bias = kind.bias_delta()
            self._deltas[key] = (kind.delta(self._base_weight()).to(device, dtype),
                                 None if bias is None else bias.to(device, dtype))
        return self._deltas[key]

    def _inference_plan(self, x: torch.Tensor):
        """Everything a no-grad forward needs, built once per blend change:
        (fused names, A, B, scales, dense terms). The fused pairs are one stacked matmul pair whose rank
        columns are scaled by weight·alpha/rank (per sample, with per-sample weights) between the two, and
        the dense ΔW are summed with their weights, so a forward is two extra matmuls for all LoRA pairs and
        one for all other kinds. A dense term is (ΔW, Δbias, per-sample weights or None)."""
        key = (x.dtype, x.device)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        with torch.no_grad():
            names = self.active()
            # ΔW of adapters no longer active are freed (a disabled adapter holds no dense copy).
            self._deltas = {k: v for k, v in self._deltas.items() if k[0] in names}
            fused, dense = self._split(names)
            A = B = cols = None
            if fused:
                # The stack depends on which adapters are on, not on their weights: a weight change (a schedule
                # at every step) costs only the R scales, applied to the rank-sized down projection.
                stack_key = (tuple(fused), x.dtype, x.device)
                if self._stacked_ab is None or self._stacked_ab[0] != stack_key:
                    A, B = self._stack(fused)
                    self._stacked_ab = (stack_key, (A.to(x.device, x.dtype), B.to(x.device, x.dtype)))
                A, B = self._stacked_ab[1]
                cols = (self._scales(fused, x.device) if self.sample_weights is None
                        else self._sample_columns(fused, x.device)).to(x.dtype)
            terms = []
            if dense and self.sample_weights is None:
                parts = [self._dense_delta(n, x.dtype, x.device) for n in dense]
                W = sum(self.weights[n] * d for n, (d, _) in zip(dense, parts))
                biases = [self.weights[n] * b for n, (_, b) in zip(dense, parts) if b is not None]
                terms = [(W, sum(biases) if biases else None, None)]
            elif dense:
                table = self._sample_table(dense).to(x.device, x.dtype)
                terms = [(*self._dense_delta(n, x.dtype, x.device), table[:, i]) for i, n in enumerate(dense)]
            plan = (fused, A, B, cols, terms)
        self._cache = (key, plan)
        return plan

    def _down(self, x, A):
        if self.is_conv:
            b = self.base
            return F.conv2d(x, A, None, b.stride, b.padding, b.dilation)
        return F.linear(x, A)

    def _up(self, h, B):
        return F.conv2d(h, B) if self.is_conv else F.linear(h, B)

    def _dense(self, x, W, bias):
        """x through a weight shaped like the base's (ΔW), with the base's stride and padding."""
        if self.is_conv:
            b = self.base
            return F.conv2d(x, W, bias, b.stride, b.padding, b.dilation, b.groups)
        return F.linear(x, W, bias)

    def _apply_columns(self, h: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Scale h's rank columns per sample; the batch is the samples tiled (CFG doubles it)."""
        n = cols.shape[0]
        if h.shape[0] % n:
            raise ValueError(f"batch of {h.shape[0]} is not a multiple of the {n} per-sample weights")
        cols = cols.repeat(h.shape[0] // n, 1)
        return h * (cols.view(*cols.shape, 1, 1) if self.is_conv else cols.view(cols.shape[0], *([1] * (h.dim() - 2)), -1))

    def _per_sample(self, h: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Scale each sample's output by its weight; the batch is the samples tiled."""
        n = weights.shape[0]
        if h.shape[0] % n:
            raise ValueError(f"batch of {h.shape[0]} is not a multiple of the {n} per-sample weights")
        return h * weights.repeat(h.shape[0] // n).view(-1, *([1] * (h.dim() - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self._backup is not None:  # merged: the base weight already holds the blend
            return out
        if not (torch.is_grad_enabled() and any(p.requires_grad for p in self.adapters.parameters())):
            fused, A, B, cols, terms = self._inference_plan(x)
            if fused:
                h = self._down(x, A)
                if cols.dim() == 2:  # per-sample weights
                    h = self._apply_columns(h, cols)
                else:
                    h = h * (cols.view(1, -1, 1, 1) if self.is_conv else cols)
                out = out + self._up(h, B)
            for W, bias, weights in terms:
                h = self._dense(x, W, bias)
                out = out + (h if weights is None else self._per_sample(h, weights))
            return out
        return self._train_forward(x, out)

    def _train_forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Autograd through the stacked matmul (or per adapter, when each has its own dropout), and through
        each dense kind's ΔW, rebuilt from its tensors every step."""
        fused, dense = self._split(self.active())
        for n in dense:
            kind = self.adapters[n]
            w0 = self._base_weight()
            W = kind.delta(w0)
            bias = kind.bias_delta()
            h = self._dense(x if torch.is_autocast_enabled(x.device.type) else x.to(W.dtype), W, bias)
            if self.sample_weights is not None:
                h = self._per_sample(h, self._sample_table([n])[:, 0].to(h.device, h.dtype))
            else:
                h = h * self.weights[n]
            out = out + h.to(out.dtype)
        if not fused:
            return out
        if self.training and any(self.adapters[n].dropout > 0 for n in fused):
            for n in fused:
                k = self.adapters[n]
                h = self._down(F.dropout(x.to(k.A.dtype), k.dropout), k.A)
                out = out + (self._up(h, k.B) * (self.weights[n] * k.alpha / k.rank)).to(out.dtype)
            return out
        A, B = self._stack(fused)
        # Under autocast the matmul runs in half precision anyway: casting x up to float32 first
        # would only add a copy of every input (and keep it for backward).
        h = self._down(x if torch.is_autocast_enabled(x.device.type) else x.to(A.dtype), A)
        if self.sample_weights is not None:
            h = self._apply_columns(h, self._sample_columns(fused, x.device).to(h.dtype))
        else:
            s = self._scales(fused, x.device).to(h.dtype)
            h = h * (s.view(1, -1, 1, 1) if self.is_conv else s)
        return out + self._up(h, B).to(out.dtype)

    # -- merging --------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active blend into the base weight (again, from the exact original, if merged).

        W = W0 + B_cat·diag(s)·A_cat + Σ weight·ΔW_dense in float32: one matmul for all LoRA pairs, so a
        weight change in merged mode costs a few kernels per layer. A dense kind's Δbias goes into the bias."""
        if self.sample_weights is not None:
            raise ValueError("per-sample weights cannot be merged into the base weights")
        w = self.base.weight
        if not w.is_floating_point() or type(w.data) not in (torch.Tensor, nn.Parameter):
            raise ValueError("a quantized base weight cannot take a merged blend; use the blend at run time")
        if self._backup is None:
            self._backup = w.detach().clone()
            bias = self.base.bias
            self._bias_backup = None if bias is None else bias.detach().clone()
        fused, dense = self._split(self.active())
        merged = self._backup.float().flatten(1)
        if fused:
            A, B = self._stack(fused)
            B = B.float().flatten(1) * self._scales(fused, B.device)
            merged = torch.addmm(merged, B, A.float().flatten(1))
        biases = []
        for n in dense:
            d, b = self._dense_delta(n, torch.float32, w.device)
            merged = merged + self.weights[n] * d.flatten(1)
            if b is not None:
                biases.append(self.weights[n] * b)
        w.copy_(merged.view_as(w) if (fused or dense) else self._backup)
        if self._bias_backup is not None:
            self.base.bias.copy_(self._bias_backup + sum(biases) if biases else self._bias_backup)
        elif biases:
            raise ValueError("a full delta's diff_b needs a layer with a bias")

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the bit-identical original base weight (and bias)."""
        if self._backup is not None:
            self.base.weight.copy_(self._backup)
            if self._bias_backup is not None:
                self.base.bias.copy_(self._bias_backup)
            self._backup = self._bias_backup = None

    @property
    def merged(self) -> bool:
        return self._backup is not None


class NormLayer(LoraLayer):
    """A LayerNorm or GroupNorm whose weight and bias take weighted deltas (LyCORIS's norm kinds): the
    blend, enable, per-sample weights and exact merging work as for LoraLayer."""

    NORMS = (nn.LayerNorm, nn.GroupNorm)

    def _norm(self, x: torch.Tensor, weight, bias) -> torch.Tensor:
        b = self.base
        if isinstance(b, nn.LayerNorm):
            return F.layer_norm(x, b.normalized_shape, weight, bias, b.eps)
        return F.group_norm(x, b.num_groups, weight, bias, b.eps)

    def _deltas_of(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(len(names), C) weight and bias deltas at weight 1."""
        w0 = self._base_weight()
        ws = [self.adapters[n].delta(w0).to(w0.dtype) for n in names]
        bs = [self.adapters[n].bias_delta() for n in names]
        bs = [torch.zeros_like(w0) if b is None else b.to(w0.dtype) for b in bs]
        return torch.stack(ws), torch.stack(bs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        names = self.active()
        if self._backup is not None or not names:
            return self.base(x)
        w0 = self.base.weight
        b0 = self.base.bias if self.base.bias is not None else torch.zeros_like(w0)
        dw, db = self._deltas_of(names)
        if self.sample_weights is None:
            s = torch.tensor([self.weights[n] for n in names], dtype=w0.dtype, device=w0.device)
            return self._norm(x, w0 + s @ dw, b0 + s @ db)
        table = self._sample_table(names).to(w0.device, w0.dtype)  # (samples, adapters)
        n = table.shape[0]
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} is not a multiple of the {n} per-sample weights")
        W, B = (w0 + table @ dw).repeat(x.shape[0] // n, 1), (b0 + table @ db).repeat(x.shape[0] // n, 1)
        view = (-1, *[1] * (x.dim() - 2), W.shape[1]) if isinstance(self.base, nn.LayerNorm) else \
            (-1, W.shape[1], *[1] * (x.dim() - 2))
        return self._norm(x, None, None) * W.view(view) + B.view(view)

    @torch.no_grad()
    def merge(self) -> None:
        if self.sample_weights is not None:
            raise ValueError("per-sample weights cannot be merged into the base weights")
        if self._backup is None:
            self._backup = self.base.weight.detach().clone()
            self._bias_backup = None if self.base.bias is None else self.base.bias.detach().clone()
        names = self.active()
        self.base.weight.copy_(self._backup)
        if self._bias_backup is not None:
            self.base.bias.copy_(self._bias_backup)
        if names:
            dw, db = self._deltas_of(names)
            s = torch.tensor([self.weights[n] for n in names], dtype=dw.dtype, device=dw.device)
            self.base.weight.add_(s @ dw)
            if self._bias_backup is not None:
                self.base.bias.add_(s @ db)

"""All the adapters on a pipeline: create, load, blend, merge, export, remove.

Layers are addressed by `component.path` (see state.py). Weights are per adapter, with an optional
separate text-encoder weight (as A1111's te/unet multipliers), and can be set per sample.
"""

from __future__ import annotations

import contextlib
import re

import torch
from torch import nn

from .blocks import block_of
from .inject import find, put_back, text_encoder_targets, unet_targets, unwrap, wrap
from .kinds import kind_for
from .layer import LoraLayer, NormLayer
from .modules import LoraModule
from .state import COMPONENTS, Adapter, Blend, split_component

NAME_RE = re.compile(r"[A-Za-z0-9_\-]{1,100}")  # also the app's rule for names in requests


class AdapterError(ValueError):
    """An adapter that does not fit the pipeline (unknown module, wrong shape, bad name)."""


class Adapters:
    def __init__(self, pipe_or_components):
        if isinstance(pipe_or_components, dict):
            parts = pipe_or_components
        else:
            parts = {c: getattr(pipe_or_components, c, None) for c in COMPONENTS}
        self.components: dict[str, nn.Module] = {c: m for c, m in parts.items() if m is not None}
        self.layers: dict[str, LoraLayer] = {}
        self.names: list[str] = []
        self.merged = False
        self._blocks: dict[str, str | None] = {}  # layer key -> its LBW block (lora/blocks.py)

    # -- adding ---------------------------------------------------------------------------------
    def targets(self, preset: str = "cross-attn", text_encoder: bool = False, te_mlp: bool = False) -> list[str]:
        keys = [f"unet.{p}" for p in unet_targets(self.components["unet"], preset)]
        if text_encoder:
            for c in ("text_encoder", "text_encoder_2"):
                if c in self.components:
                    keys += [f"{c}.{p}" for p in text_encoder_targets(self.components[c], te_mlp)]
        return keys

    def _check_new(self, name: str) -> None:
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise AdapterError(f"adapter name {name!r} must be 1-100 letters, digits, '_' or '-'")
        if name in self.names:
            raise AdapterError(f"an adapter named {name!r} is already loaded")

    def _layer(self, key: str) -> LoraLayer:
        if key in self.layers:
            return self.layers[key]
        component, path = split_component(key)
        if component not in self.components:
            raise AdapterError(f"{key}: the pipeline has no {component}")
        try:
            layer = wrap(self.components[component], path)
        except AttributeError:
            raise AdapterError(f"{key}: no such module in the {component}") from None
        except ValueError as e:
            raise AdapterError(f"{key}: {e}") from None
        self.layers[key] = layer
        return layer

    def create(self, name: str, keys: list[str], rank: int = 4, alpha: float | None = None,
               conv_rank: int | None = None, conv_alpha: float | None = None, init: str = "kaiming",
               dropout: float = 0.0, dtype: torch.dtype = torch.float32, kind: str = "lora",
               **options) -> list[nn.Parameter]:
        """A new trainable adapter of `kind` on `keys`; returns its parameters (the only ones that require
        grad). options: LoKr's factor and full_matrix (lora/kinds.py new_module)."""
        self._check_new(name)
        alpha = float(rank if alpha is None else alpha)
        for key in keys:
            layer = self._layer(key)
            spatial = layer.is_conv and layer.base.kernel_size != (1, 1)
            r, a = (conv_rank or rank, conv_alpha if conv_alpha is not None else alpha) if spatial else (rank, alpha)
            layer.add(name, r, a, init=init, dropout=dropout, dtype=dtype, kind=kind, **options)
        self.names.append(name)
        return self.parameters(name)

    def load(self, name: str, adapter: Adapter, weight: float = 1.0, te_weight: float | None = None,
             dtype: torch.dtype = torch.float32) -> None:
        """Attach a trained adapter. Strict: every module must exist and every shape must fit, or nothing loads."""
        self._check_new(name)
        self.check(adapter)
        for key, module in adapter.modules.items():
            self._layer(key).load(name, module, dtype=dtype)
        self.names.append(name)
        self.set_weight(name, weight, te_weight)

    def check(self, adapter: Adapter) -> None:
        """AdapterError unless every module of `adapter` exists in this pipeline and fits its weight's
        shape. Works on shapes alone: meta tensors (load_adapter_shapes) will do."""
        for key, module in adapter.modules.items():
            self._check_fits(key, module)

    def _check_fits(self, key: str, module: LoraModule) -> None:
        component, path = split_component(key)
        root = self.components.get(component)
        if root is None:
            raise AdapterError(f"it has {component} modules but the pipeline has no {component}")
        try:
            base = find(root, path)
        except AttributeError:
            raise AdapterError(f"module {key} does not exist in this model") from None
        base = base.base if isinstance(base, LoraLayer) else base
        norm = isinstance(base, NormLayer.NORMS)
        if norm != (getattr(module, "kind", None) == "norm"):
            what = "a norm layer" if norm else f"a {type(base).__name__}"
            raise AdapterError(f"module {key} is {what}, which a {getattr(module, 'kind', '?')} adapter cannot change")
        if not norm and not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise AdapterError(f"module {key} is a {type(base).__name__}, not a Linear or Conv2d")
        if base.weight is None:
            raise AdapterError(f"module {key} has no weight to change")
        try:
            why = kind_for(module).misfit(module, base.weight)
        except TypeError as e:
            raise AdapterError(f"module {key}: {e}") from None
        if why:
            raise AdapterError(f"module {key}: {why}")

    # -- blending -------------------------------------------------------------------------------
    def set_weight(self, name: str, weight: float, te_weight: float | None = None) -> None:
        """The blend multiplier of one adapter; te_weight (if given) applies to the text encoders."""
        self._known(name)
        for key, layer in self.layers.items():
            if name in layer.adapters:
                is_te = not key.startswith("unet.")
                layer.set_weight(name, te_weight if (is_te and te_weight is not None) else weight)
        self._remerge()

    def apply(self, blend: Blend, step: int | None = None, steps: int | None = None) -> None:
        """Exactly this blend at a 0-based denoising step of `steps` (None: the first): its adapters on at
        their weights, per block and per step, every other loaded adapter off. Only the layers whose weights
        move are touched, so applying the same blend again, or a schedule at the next step, costs little."""
        for name in blend.weights:
            self._known(name)
        changed = False
        for key, layer in self.layers.items():
            wanted = self._layer_weights(blend, key, layer, step, steps)
            for n in layer.adapters.keys():
                on = n in wanted
                if layer.enabled[n] != on:
                    layer.enable(n, on)
                    changed = True
                if on and layer.weights[n] != wanted[n]:
                    layer.set_weight(n, wanted[n])
                    changed = True
        if changed:
            self._remerge()

    def _block(self, key: str) -> str | None:
        if key not in self._blocks:
            unet = self.components.get("unet")
            self._blocks[key] = block_of(key, getattr(getattr(unet, "config", None), "layers_per_block", 2))
        return self._blocks[key]

    def _layer_weights(self, blend: Blend, key: str, layer: LoraLayer, step, steps) -> dict[str, float]:
        """{adapter: multiplier} of the blend's adapters in one layer; with blend.normalize, scaled down so
        that the summed update is no larger (Frobenius norm) than the largest single one."""
        wanted = {n: blend.layer_weight(n, key, self._block(key), step, steps)
                  for n in layer.adapters.keys() if n in blend.weights}
        if blend.normalize and sum(1 for w in wanted.values() if w) > 1:
            factor = layer.norm_factor(wanted)
            wanted = {n: w * factor for n, w in wanted.items()}
        return wanted

    def enable(self, name: str, on: bool = True) -> None:
        self._known(name)
        for layer in self.layers.values():
            if name in layer.adapters:
                layer.enable(name, on)
        self._remerge()

    def set_sample_weights(self, rows: list | None, step: int | None = None, steps: int | None = None) -> None:
        """One blend per sample: rows[i] is sample i's Blend (or {adapter name: weight}), at a 0-based
        denoising step (None: the first); None clears it."""
        if rows is not None and self.merged:
            raise AdapterError("unmerge before using per-sample weights")
        rows = [r if isinstance(r, Blend) else Blend(dict(r)) for r in rows] if rows else None
        names = sorted({n for row in rows for n in row.weights}) if rows else []
        for n in names:
            self._known(n)
        for key, layer in self.layers.items():
            if rows is None:
                layer.set_sample_weights([], None)
                continue
            present = [n for n in names if n in layer.adapters]
            per_row = [self._layer_weights(row, key, layer, step, steps) for row in rows]
            # A layer holding none of them gets a (n, 0) table: the base for every sample.
            layer.set_sample_weights(present, torch.tensor([[float(w.get(n, 0.0)) for n in present]
                                                            for w in per_row]).reshape(len(rows), len(present)))

    def changed(self) -> None:
        """Adapter tensors were updated in place (an optimizer step): rebuild the inference caches."""
        for layer in self.layers.values():
            layer.changed()

    def merge(self) -> None:
        """Fold the current blend into the base weights: no per-step cost until the blend changes."""
        for layer in self.layers.values():
            layer.merge()
        self.merged = True

    def unmerge(self) -> None:
        for layer in self.layers.values():
            layer.unmerge()
        self.merged = False

    def _remerge(self) -> None:
        if self.merged:
            for layer in self.layers.values():
                layer.merge()

    # -- reading and removing -------------------------------------------------------------------
    def _known(self, name: str) -> None:
        if name not in self.names:
            raise AdapterError(f"no adapter named {name!r} is loaded")

    def parameters(self, name: str) -> list[nn.Parameter]:
        self._known(name)
        return list(self.named_parameters(name).values())

    def named_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """'{layer key}.{tensor}' (for LoRA: .A and .B) -> parameter; the keys of training checkpoints."""
        return {f"{key}.{p}": t for key, layer in self.layers.items() if name in layer.adapters
                for p, t in layer.adapters[name].named_parameters()}

    def export(self, name: str) -> Adapter:
        """The adapter's weights as detached float32 CPU tensors."""
        self._known(name)
        modules = {}
        for key, layer in self.layers.items():
            if name in layer.adapters:
                modules[key] = layer.module(name).detached_copy()
        return Adapter(modules)

    @contextlib.contextmanager
    def unwrapped(self):
        """The components with their original modules in place of the wrappers (to save them as plain
        modules, with the blend merged in first); the wrappers go back afterwards."""
        for key in self.layers:
            component, path = split_component(key)
            unwrap(self.components[component], path)
        try:
            yield
        finally:
            for key, layer in self.layers.items():
                component, path = split_component(key)
                put_back(self.components[component], path, layer)

    def remove(self, name: str) -> None:
        self._known(name)
        was_merged = self.merged
        if was_merged:
            self.unmerge()
        for key in list(self.layers):
            layer = self.layers[key]
            layer.remove(name)
            if not layer.adapters:
                component, path = split_component(key)
                unwrap(self.components[component], path)
                del self.layers[key]
        self.names.remove(name)
        if was_merged and self.names:
            self.merge()

    def remove_all(self) -> None:
        for name in list(self.names):
            self.remove(name)

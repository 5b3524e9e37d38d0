"""The server-side state shared by every user: one pipeline, one lock, the adapters folder, the outputs.

A user's blend is theirs (a `gr.State` dict, see `blend.py`); the pipeline is shared. A generation
takes the lock, loads any adapter it needs that is not loaded yet, sets every loaded adapter's weight
from its own blend, and runs. Adapters stay loaded, so a new weight costs nothing but a number; no
other request can change the weights until the lock is released (RELIABILITY.md §3, U5).
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from pathlib import Path

import torch

from imglora.errors import ImgloraError
from imglora.formats.files import clean_temp_files
from imglora.generate import save_png
from imglora.formats.lora_file import load_adapter_shapes
from imglora.lora.adapters import AdapterError, Adapters
from imglora.lora.state import Blend
from imglora.pipeline import Model, attach, load_model

from .catalogue import Catalogue

SCHEDULERS = {  # label -> (diffusers class, extra config)
    "model default": (None, {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}


class NonFinite(ImgloraError):
    """NaN or Inf in the model's output (RELIABILITY.md U6): a message, never a black image."""


def open_model(model, device: str = "cpu") -> Model:
    """load_model, with a missing embedded default model turned into a message."""
    dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    try:
        return load_model(model, device=device, dtype=dtype)
    except ImportError:
        if model is not None:
            raise
        raise ImgloraError("no --model given and the embedded default model is not installed",
                           "pass --model PATH (a diffusers folder)") from None


class Session:
    def __init__(self, model: Model, adapters_dir, outputs_dir="outputs", uploads_enabled: bool = True,
                 max_upload_mb: int = 512, max_grid: int = 64):
        self.model = model
        self.pipe = model.pipe
        self.arch = model.arch
        self.adapters = Adapters(model.pipe)
        self.lock = threading.RLock()
        self.catalogue = Catalogue(adapters_dir, self.arch, misfit=self._misfit)
        self.catalogue.folder.mkdir(parents=True, exist_ok=True)
        clean_temp_files(self.catalogue.folder)  # uploads a killed server left half-validated
        self.outputs = Path(outputs_dir).expanduser().resolve()
        self.uploads_enabled = uploads_enabled
        self.max_upload_bytes = int(max_upload_mb) * 1024 * 1024
        self.max_grid = max_grid
        self.loaded: dict[str, tuple] = {}  # name -> (path, fingerprint) of what is on the pipeline
        self.merged_blend: dict | None = None  # the blend folded into the weights, in merge mode
        self._default_scheduler = model.pipe.scheduler
        self._save_lock = threading.Lock()
        self.catalogue.scan()

    # -- the pipeline, under the lock ---------------------------------------------------------------
    @contextlib.contextmanager
    def using(self, blend: Blend, merge: bool = False, scheduler: str = "model default", sample_rows: bool = False):
        """Hold the model with exactly `blend` active; all other adapters off.

        merge: fold the blend into the base weights (faster steps; re-merged only when the blend changes).
        sample_rows: leave it unmerged, for per-image blends (comparison grids).
        """
        with self.lock:
            self._drop_gone()
            for name in blend.weights:
                self._ensure_loaded(name)
            self._set_blend(blend, merge and not sample_rows)
            self.pipe.scheduler = self._scheduler(scheduler)
            watch = _NonFiniteWatch(self.pipe)
            try:
                yield self.model
                watch.check()
            finally:
                watch.remove()
                self.pipe.scheduler = self._default_scheduler

    def _misfit(self, path) -> str | None:
        """Why a file's modules do not fit this model, from its header (the catalogue lists the reason)."""
        try:
            self.adapters.check(load_adapter_shapes(path, self.model.layers_per_block))
        except AdapterError as e:
            return str(e)
        return None

    def _ensure_loaded(self, name: str) -> None:
        entry = self.catalogue.get(name)
        if self.loaded.get(name) == (entry.path, entry.fingerprint):
            return
        self.unmerge()
        if name in self.adapters.names:  # the file changed since it was loaded
            self.adapters.remove(name)
            self.loaded.pop(name, None)
        try:
            self.catalogue.card(name)  # the strict full read: NaN, keys, arch (cached per file version)
            attach(self.model, self.adapters, entry.path, weight=0.0, name=name)
        except ImgloraError as e:
            if entry.error is None:
                self.catalogue.mark_broken(entry, e)
            raise ImgloraError(f"adapter {name!r} cannot be used: {entry.error}", "", path=entry.path.name) from None
        self.loaded[name] = (entry.path, entry.fingerprint)

    def _drop_gone(self) -> None:
        """Unload adapters whose file has left the folder (they hold memory, and nobody can ask for them)."""
        for name in [n for n in self.loaded if n not in self.catalogue.entries]:
            self.unmerge()
            self.adapters.remove(name)
            del self.loaded[name]

    def _set_blend(self, blend: Blend, merge: bool) -> None:
        key = tuple(sorted(blend.pairs().items()))
        if merge and self.merged_blend == key:
            return  # already folded in: no per-step cost, nothing to redo
        self.unmerge()
        self.adapters.apply(blend)
        if merge:
            self.adapters.merge()
            self.merged_blend = key

    def unmerge(self) -> None:
        """Back to the exact base weights (the adapters stay loaded)."""
        if self.adapters.merged:
            self.adapters.unmerge()
        self.merged_blend = None

    def _scheduler(self, label: str):
        if label not in SCHEDULERS:
            raise ImgloraError(f"unknown scheduler {label!r}", f"choose one of {', '.join(SCHEDULERS)}")
        cls_name, extra = SCHEDULERS[label]
        if cls_name is None:
            return self._default_scheduler
        import diffusers

        return getattr(diffusers, cls_name).from_config(self._default_scheduler.config, **extra)

    # -- outputs ---------------------------------------------------------------------------------------
    def save_image(self, image, parameters: str, prefix: str = "imglora") -> Path:
        """Save into the outputs folder under the next free number; atomic and never overwriting."""
        with self._save_lock:
            self.outputs.mkdir(parents=True, exist_ok=True)
            pattern = re.compile(rf"{re.escape(prefix)}-(\d+)\.png$")
            numbers = [int(m.group(1)) for n in os.listdir(self.outputs) if (m := pattern.match(n))]
            k = max(numbers, default=-1) + 1
            while True:
                try:
                    return save_png(image, self.outputs / f"{prefix}-{k:05d}.png", parameters)
                except ImgloraError:
                    if not (self.outputs / f"{prefix}-{k:05d}.png").exists():
                        raise
                    k += 1  # another process took this number meanwhile


class _NonFiniteWatch:
    """Forward hooks on the UNet and VAE decoder that note NaN/Inf outputs during a generation."""

    def __init__(self, pipe):
        self.where: str | None = None
        self.handles = []
        for label, module in (("UNet", getattr(pipe, "unet", None)), ("VAE decoder", getattr(getattr(pipe, "vae", None),
                                                                                               "decoder", None))):
            if module is not None:
                self.handles.append(module.register_forward_hook(self._hook(label)))

    def _hook(self, label):
        def hook(module, inputs, output):
            t = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
            if self.where is None and torch.is_tensor(t) and not torch.isfinite(t).all():
                self.where = label
        return hook

    def check(self) -> None:
        if self.where:
            raise NonFinite(f"the {self.where} produced NaN or Inf values, so the image would be black",
                            "lower the adapter weights, or run in fp32 (nothing was saved)")

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

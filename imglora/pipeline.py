"""A base model as the rest of imglora sees it: the diffusers pipeline and what is known about it.

`load_model()` reads a model from local files (models/load.py) and works out its architecture once;
`attach()` puts an adapter file onto it. Nothing is stored on the diffusers pipeline itself.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ImgloraError
from .formats.detect import check_arch
from .formats.embeddings import read_bundled
from .formats.lora_file import load_adapter
from .lora.adapters import AdapterError, Adapters
from .models.load import load_pipeline, resolve_model
from .train.embeddings import add_tokens, check_tokens


@dataclass(eq=False)
class Model:
    pipe: object  # a StableDiffusionPipeline or StableDiffusionXLPipeline
    path: Path | None = None  # where it was loaded from (None: built in memory)
    arch: str = "sd1"  # sd1, sd2 or sdxl
    prediction: str = "epsilon"  # or v_prediction
    layers_per_block: int = 2
    defaults: dict = field(default_factory=dict)  # generation defaults from the folder's imglora.json

    @property
    def resolution(self) -> int:
        return self.defaults.get("resolution") or self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    @property
    def name(self) -> str:
        return self.path.name if self.path else "model"


def model_of(pipe, path: str | os.PathLike | None = None) -> Model:
    """The Model of a pipeline already in memory (and of the folder it came from, if any)."""
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    cfg = pipe.unet.config
    if getattr(pipe, "text_encoder_2", None) is not None:
        arch = "sdxl"
    else:
        sd2 = cfg.cross_attention_dim == 1024 or (cfg.use_linear_projection and cfg.cross_attention_dim != 768)
        arch = "sd2" if sd2 else "sd1"
    lpb = cfg.layers_per_block
    path = Path(path) if path is not None else None
    defaults = {}
    if path is not None and (path / "imglora.json").is_file():
        try:
            defaults = json.loads((path / "imglora.json").read_text())
        except ValueError as e:
            raise ImgloraError(f"malformed imglora.json ({e})", "repair or delete it", path=path / "imglora.json") from None
    return Model(pipe, path, arch, prediction, lpb if isinstance(lpb, int) else lpb[0], defaults)


def load_model(model: str | os.PathLike | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
               config: str | os.PathLike | None = None) -> Model:
    """A Stable Diffusion 1.x/2.x or SDXL model from local files (the embedded one by default)."""
    return model_of(load_pipeline(model, device=device, dtype=dtype, config=config), resolve_model(model))


def adapter_name(path: str | os.PathLike, taken: list[str] = ()) -> str:
    """A safe, unused adapter name from a file name ('my.style v2.safetensors' -> 'my_style_v2')."""
    base = re.sub(r"[^A-Za-z0-9_\-]", "_", Path(path).stem)[:90] or "adapter"
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def attach(model: Model, adapters: Adapters, path: str | os.PathLike, weight: float = 1.0,
           te_weight: float | None = None, name: str | None = None) -> str:
    """Load an adapter file onto the model's Adapters under `name`; a file for another base model is a
    clear error, and so is one whose modules do not fit."""
    adapter, _ = load_adapter(path, model.layers_per_block)
    check_arch(adapter.arch, model.arch, path)
    embeddings = read_bundled(path)  # its textual-inversion tokens (A1111's bundle_emb.*) come with it
    check_tokens(model.pipe, embeddings, path)  # before anything loads: all or nothing
    name = name or adapter_name(path, adapters.names)
    try:
        adapters.load(name, adapter, weight, te_weight)
    except AdapterError as e:
        raise ImgloraError(f"does not fit this model: {e}", "use an adapter trained for this base model",
                           path=path) from None
    add_tokens(model.pipe, embeddings, path)
    return name

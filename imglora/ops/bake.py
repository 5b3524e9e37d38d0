"""Baking a blend into the base model: a diffusers folder whose weights already hold the adapters."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..formats.files import atomic_dir
from ..lora.adapters import Adapters
from ..pipeline import Model


def save_baked(model: Model, adapters: Adapters, folder: str | os.PathLike) -> Path:
    """Save the pipeline with the adapters' current blend merged in, as `folder` (which must not exist).

    The live pipeline is left as it was: the wrappers are out only while saving (so the folder has the
    plain module names), and the exact base weights are restored afterwards."""
    was_merged = adapters.merged
    with atomic_dir(folder) as tmp:
        adapters.merge()
        try:
            with adapters.unwrapped():
                model.pipe.save_pretrained(tmp, safe_serialization=True)
        finally:
            if not was_merged:
                adapters.unmerge()
        if model.path is not None and (model.path / "imglora.json").is_file():
            shutil.copy2(model.path / "imglora.json", tmp / "imglora.json")  # the generation defaults travel with it
    return Path(folder)

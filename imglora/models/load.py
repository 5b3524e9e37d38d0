"""Loading base models offline: a diffusers folder, a single checkpoint file, or the embedded default."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import ImgloraError

PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def native_resolution(model: str | os.PathLike | None, config: str | os.PathLike | None = None) -> int | None:
    """The model's training resolution from its config files alone (no weights are read)."""
    path = resolve_model(model)
    folder = path if path.is_dir() else (Path(config) if config else None)
    if folder is None:
        return None
    try:
        if (folder / "imglora.json").is_file():
            return json.loads((folder / "imglora.json").read_text())["resolution"]
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        return unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, KeyError, ValueError, TypeError):
        return None  # the full load will say what is wrong


def resolve_model(model: str | os.PathLike | None) -> Path:
    if model is None:
        from .embedded import default_model_path

        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ImgloraError("no such model folder or file", "pass a local diffusers folder or a .safetensors checkpoint",
                           path=path)
    return path


def load_pipeline(model: str | os.PathLike | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
                  config: str | os.PathLike | None = None):
    """A Stable Diffusion (1.x/2.x) or SDXL pipeline from local files only; never downloads."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _quiet_loading()
    path = resolve_model(model)
    if path.is_dir():
        pipe = _load_folder(path)
    else:
        pipe = _load_single_file(path, config)
    return pipe.to(device, dtype) if dtype != torch.float32 else pipe.to(device)


def _quiet_loading() -> None:
    """Loading a local model takes a second; its progress bars and advice only clutter our output."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()  # e.g. advice on `.to(dtype)` that our casts already follow
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _load_folder(path: Path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    index = path / "model_index.json"
    if not index.is_file():
        raise ImgloraError("not a diffusers model folder (no model_index.json)",
                           "pass the folder that holds model_index.json, or a .safetensors checkpoint", path=path)
    try:
        name = json.loads(index.read_text()).get("_class_name", "")
    except ValueError as e:
        raise ImgloraError(f"unreadable model_index.json ({e})", "repair or re-download the model", path=index) from None
    cls = StableDiffusionXLPipeline if "XL" in name else StableDiffusionPipeline
    if name not in PIPELINE_CLASSES:
        raise ImgloraError(f"a {name or 'unknown'} model, not Stable Diffusion 1.x/2.x/XL",
                           "imglora trains SD 1.x, SD 2.x and SDXL pipelines", path=path)
    _refuse_pickles(path)
    kwargs = {"safety_checker": None, "requires_safety_checker": False} if cls is StableDiffusionPipeline else {}
    try:
        return cls.from_pretrained(path, local_files_only=True, use_safetensors=True, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ImgloraError(f"cannot load the model ({str(e).splitlines()[0]})",
                           "check that the folder is complete (unet, vae, text_encoder, tokenizer, scheduler)",
                           path=path) from None


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _refuse_pickles(path: Path) -> None:
    """A component whose weights exist only as a pickle is refused before anything is loaded: unpickling
    can run code (RELIABILITY.md §1), and the library's own message would advise loading it unsafely."""
    for component in sorted(p for p in path.iterdir() if p.is_dir() and (p / "config.json").is_file()):
        files = [f for f in component.iterdir() if f.is_file()]
        if any(f.suffix in PICKLE_SUFFIXES for f in files) and not any(f.suffix == ".safetensors" for f in files):
            raise ImgloraError(f"the {component.name} weights are a pickle, not safetensors",
                               "convert them to .safetensors with a trusted tool; pickles can run code and are "
                               "not loaded", path=component)


def _load_single_file(path: Path, config):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if path.suffix not in (".safetensors", ".ckpt"):
        raise ImgloraError("not a model checkpoint", "pass a diffusers folder or a .safetensors/.ckpt file", path=path)
    if config is None:
        raise ImgloraError("a single-file checkpoint needs its pipeline config, and nothing is downloaded",
                           "pass --model-config DIR: a local diffusers folder of the same architecture (its "
                           "model_index.json and component configs are used)", path=path)
    if path.suffix == ".ckpt":
        # weights_only=True always (RELIABILITY.md §1): a pickle can run code.
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # torch's own message advises weights_only=False, which could run the file's code
            raise ImgloraError("refused to load the pickle: it holds more than plain tensors, and unpickling "
                               "those could run code", "convert it to .safetensors with a trusted tool",
                               path=path) from None
        del state
    name = json.loads((Path(config) / "model_index.json").read_text()).get("_class_name", "")
    cls = StableDiffusionXLPipeline if "XL" in name else StableDiffusionPipeline
    try:
        return cls.from_single_file(str(path), config=str(config), local_files_only=True)
    except Exception as e:
        raise ImgloraError(f"cannot load the checkpoint ({str(e).splitlines()[0][:200]})",
                           "check that --model-config matches the checkpoint's architecture", path=path) from None

"""Header metadata: kohya's ss_* set, Stability's modelspec.*, and imglora's own config (FORMATS.md §4)."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from ..lora.modules import LoraModule

from ..lora.state import Adapter

ARCH_INFO = {
    # arch: (ss_base_model_version, modelspec.architecture, implementation, resolution)
    "sd1": ("sd_v1", "stable-diffusion-v1/lora", "diffusers", "512x512"),
    "sd2": ("sd_v2", "stable-diffusion-v2-512/lora", "diffusers", "512x512"),
    "sd2-v": ("sd_v2_v", "stable-diffusion-v2-768-v/lora", "diffusers", "768x768"),
    "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "https://github.com/Stability-AI/generative-models",
             "1024x1024"),
}
CONFIG_KEY = "imglora.config"


def arch_key(arch: str, prediction: str = "epsilon") -> str:
    return "sd2-v" if arch == "sd2" and prediction == "v_prediction" else arch


def build_metadata(adapter: Adapter, arch: str, name: str, prediction: str = "epsilon", resolution: int | None = None,
                   config: dict | None = None, extra: dict | None = None) -> dict[str, str]:
    """The ss_* minimum set and useful extras, modelspec.*, and the training config as JSON; all strings."""
    base_version, spec_arch, impl, default_res = ARCH_INFO.get(arch_key(arch, prediction), ARCH_INFO["sd1"])
    res = f"{resolution}x{resolution}" if resolution else default_res
    meta = {
        "ss_v2": str(arch == "sd2"),
        "ss_base_model_version": base_version,
        **network_fields(adapter),
        "ss_output_name": name,
        "ss_resolution": f"({resolution}, {resolution})" if resolution else "",
        "ss_training_comment": "made with imglora",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": spec_arch,
        "modelspec.implementation": impl,
        "modelspec.title": name,
        "modelspec.resolution": res,
        "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.prediction_type": "v" if prediction == "v_prediction" else "epsilon",
    }
    if config is not None:
        meta[CONFIG_KEY] = json.dumps(config, sort_keys=True, default=str)
        if config.get("loraplus_lr_ratio") is not None:  # kohya and LyCORIS record it among the network args
            args = {**json.loads(meta["ss_network_args"]), "loraplus_lr_ratio": str(config["loraplus_lr_ratio"])}
            meta["ss_network_args"] = json.dumps(args)
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    return {k: v for k, v in meta.items() if v != ""}


def _dim_alpha(modules: list) -> tuple[int | str, str]:
    """(the rank most of `modules` have, their alpha or "Dynamic" when it differs)."""
    rank = Counter(getattr(m, "rank", None) or "full" for m in modules).most_common(1)[0][0]
    alphas = {getattr(m, "alpha", None) for m in modules}
    alpha = alphas.pop() if len(alphas) == 1 else "Dynamic"
    return rank, str(alpha if alpha is not None else 1.0)


def _spatial(m) -> bool:
    """A LoRA module of a k×k convolution (k > 1): LoCon's conv_dim/conv_alpha describe these."""
    return isinstance(m, LoraModule) and m.A.dim() == 4 and (m.A.shape[-1] > 1 or m.mid is not None)


def network_fields(adapter: Adapter) -> dict[str, str]:
    """ss_network_module, ss_network_dim, ss_network_alpha and ss_network_args as the tensors have them (a
    file never states a rank its tensors do not have): networks.lora for plain LoRA/LoCon; lycoris.kohya
    with algo (and dora_wd) for the other kinds, as LyCORIS writes them."""
    modules = list(adapter.modules.values())
    conv = [m for m in modules if _spatial(m)]
    linear = [m for m in modules if not _spatial(m)]
    args = {}
    if conv:
        conv_dim, conv_alpha = _dim_alpha(conv)
        args = {"conv_dim": str(conv_dim), "conv_alpha": conv_alpha}
    ref = linear or conv
    dim, alpha = _dim_alpha(ref) if ref else (0, "Dynamic")
    kinds = {m.kind for m in modules}
    dora = any(getattr(m, "dora_scale", None) is not None for m in modules)
    module = "networks.lora"
    if kinds - {"lora"} or dora or any(getattr(m, "mid", None) is not None for m in modules):
        module = "lycoris.kohya"
        algo = kinds.pop() if len(kinds) == 1 else "mixed"
        args = {**args, "algo": {"lora": "locon", "oft": "diag-oft"}.get(algo, algo)}  # LyCORIS's algo names
        if dora:
            args["dora_wd"] = "True"
        if not conv and algo != "lora":  # LyCORIS records the conv dims whatever they cover
            args.update(conv_dim=str(dim), conv_alpha=alpha)
    return {"ss_network_module": module, "ss_network_dim": str(dim), "ss_network_alpha": alpha,
            "ss_network_args": json.dumps(args)}


def training_metadata(cfg, model_name: str, examples: list[tuple], step: int, epoch: int, started: str) -> dict:
    """kohya's ss_* record of a training run (FORMATS.md §4.1); examples are (path, caption) pairs."""
    tags: dict[str, int] = {}
    for _, caption in examples:
        for tag in (t.strip() for t in caption.split(",")):
            if tag:
                tags[tag] = tags.get(tag, 0) + 1
    extra = {
        "ss_sd_model_name": model_name,
        "ss_num_train_images": str(len({path for path, _ in examples})),
        "ss_steps": str(step), "ss_epoch": str(epoch),
        "ss_learning_rate": str(cfg.lr), "ss_unet_lr": str(cfg.lr),
        "ss_text_encoder_lr": str(cfg.text_encoder_lr or cfg.lr) if cfg.train_text_encoder else "0",
        "ss_optimizer": cfg.optimizer, "ss_seed": str(cfg.seed), "ss_mixed_precision": cfg.mixed_precision,
        "ss_lr_scheduler": cfg.lr_scheduler, "ss_batch_size_per_device": str(cfg.batch_size),
        "ss_training_started_at": started, "ss_training_finished_at": datetime.now(timezone.utc).isoformat(),
        "ss_tag_frequency": {Path(cfg.data).name: tags},
        # kohya's keys of the noise and loss options, with its values ("None" for off, bools as True/False)
        "ss_noise_offset": str(cfg.noise_offset or None), "ss_min_snr_gamma": str(cfg.min_snr_gamma),
        "ss_multires_noise_iterations": str(cfg.multires_noise_iterations or None),
        "ss_multires_noise_discount": str(cfg.multires_noise_discount),
        "ss_zero_terminal_snr": str(cfg.zero_terminal_snr), "ss_debiased_estimation": str(cfg.debiased_estimation),
        "ss_loss_type": cfg.loss, "ss_huber_schedule": cfg.huber_schedule, "ss_huber_c": str(cfg.huber_c),
        "ss_huber_scale": "1.0",
    }
    if cfg.trigger:
        extra["modelspec.trigger_phrase"] = cfg.trigger
    return extra


def resized_metadata(metadata: dict[str, str], adapter: Adapter) -> dict[str, str]:
    """A file's metadata after its rank was changed: ss_network_dim/alpha and the conv_dim/conv_alpha of
    ss_network_args from the new tensors (alpha = rank, the scale is in the tensors); other network args kept."""
    fields = network_fields(adapter)
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
    except ValueError:
        args = {}
    args = {k: v for k, v in (args if isinstance(args, dict) else {}).items() if k not in ("conv_dim", "conv_alpha")}
    return {**metadata, **fields, "ss_network_args": json.dumps({**args, **json.loads(fields["ss_network_args"])})}


def arch_from_metadata(metadata: dict[str, str]) -> str | None:
    """A1111's rule (FORMATS.md §5.3), extended with modelspec."""
    version = metadata.get("ss_base_model_version", "")
    spec = metadata.get("modelspec.architecture", "")
    if version.startswith("sdxl") or spec.startswith("stable-diffusion-xl"):
        return "sdxl"
    if metadata.get("ss_v2") == "True" or version.startswith("sd_v2") or spec.startswith("stable-diffusion-v2"):
        return "sd2"
    if version.startswith("sd_v1") or spec.startswith("stable-diffusion-v1"):
        return "sd1"
    return None

"""Training configuration: one flat dataclass whose fields are the CLI flags and the TOML keys
(HELP_GROUPS sorts them into the sections of `imglora train --help`).

Defaults, then `--config run.toml`, then flags. An unknown key or a wrong type is an error naming the
key; cross-field checks live in `TrainConfig.check()`, run once everything is merged.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .data import MIN_IMAGE_SIDE
from .errors import ImgloraError


def opt(default, help: str, choices: tuple | None = None, flag: str | None = None):
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag})


FORMAT_HELP = ("file format: kohya (read by A1111, Forge, ComfyUI, kohya and diffusers) or diffusers (diffusers-PEFT "
               "keys, read by diffusers' load_lora_weights; ComfyUI ignores its UNet attention keys, A1111 reads none)")


TARGETS_HELP = ("UNet layers to adapt. cross-attn: the q/k/v/out projections of the cross-attention (attn2); attn: "
                "those of the self- and cross-attention (attn1, attn2); transformer: every Linear and 1x1 conv of the "
                "transformer blocks, i.e. attention, feed-forward and proj_in/proj_out (as kohya); conv: transformer "
                "plus the ResNet blocks' convolutions (conv1, conv2, conv_shortcut, time_emb_proj) and the down-/"
                "up-sampler convs (kohya's LoCon set; 3x3 ones use --conv-rank)")


@dataclass
class TrainConfig:
    # what to train on
    model: str | None = opt(None, "diffusers folder or .safetensors/.ckpt checkpoint (default: the embedded model)")
    model_config: str | None = opt(None, "diffusers folder whose configs describe a single-file checkpoint "
                                         "(needed with a .safetensors/.ckpt --model: nothing is downloaded)")
    data: str | None = opt(None, "folder of images with .txt/.caption captions, metadata.jsonl or N_name repeat "
                                 "folders (required, as a flag or in the TOML)")
    reg_data: str | None = opt(None, "regularisation (class) images for prior preservation (default: none)")
    prior_loss_weight: float = opt(1.0, "loss weight of the regularisation images")
    reg_uncond: float = opt(0.0, "with --reg-data: this share of the regularisation images also trains with the "
                                 "empty caption, keeping the unconditional prediction (which classifier-free "
                                 "guidance subtracts at every sampling step) as the base model made it")
    caption_extension: str = opt(".txt", "sidecar caption extension (.caption is also read)")
    caption_fallback: str | None = opt(None, "caption for images without one: folder, filename, or a template "
                                             "with {folder} and {stem} (default: none: such images are skipped)")
    trigger: str | None = opt(None, "trigger word or prefix put in front of every caption (default: none)")
    max_bad: float = opt(0.1, "stop before training if more than this fraction of images is unusable")
    min_image_side: int = opt(MIN_IMAGE_SIDE, "images with a side shorter than this are skipped")
    val_count: int = opt(0, "held-out images for a deterministic validation loss")
    # output
    output: str = opt("output", "output folder")
    name: str = opt("lora", "adapter name: OUTPUT/NAME.safetensors")
    save_format: str = opt("kohya", FORMAT_HELP, ("kohya", "diffusers"))
    save_precision: str = opt("fp16", "tensor precision of the saved adapter", ("fp32", "fp16", "bf16"))
    save_every: int = opt(0, "save a resumable checkpoint every N steps (0: only at the end and on Ctrl-C)")
    keep_last: int = opt(3, "checkpoints to keep")
    resume: str | None = opt(None, "'latest' or a checkpoint folder to continue from (default: start a new run)")
    overwrite: bool = opt(False, "replace an existing OUTPUT/NAME.safetensors")
    sample_every: int = opt(0, "render sample images every N steps (0: only at the end if prompts are given)")
    sample_prompts: list[str] = opt(None, "prompts for sample images (repeat the flag, or a TOML list; default: none)",
                                    flag="--sample-prompt")
    sample_prompts_file: str | None = opt(None, "file with one sample prompt per line (default: none)")
    sample_steps: int | None = opt(None, "inference steps for samples (default: the model's)")
    sample_guidance: float | None = opt(None, "guidance for samples (default: the model's)")
    val_every: int = opt(0, "validation loss on --val-count images every N steps (0: at each checkpoint and the end)")
    # adapter
    targets: str = opt("cross-attn", TARGETS_HELP, ("cross-attn", "attn", "transformer", "conv"))
    adapter: str = opt("lora", "adapter kind: lora (LoCon with --targets conv), loha (Hadamard product of two "
                               "low-rank pairs), lokr (Kronecker product), dora (LoRA with a learned magnitude per "
                               "output; DoRA); all saved as LyCORIS writes them", ("lora", "loha", "lokr", "dora"))
    lokr_factor: int = opt(-1, "with --adapter lokr: the size of the Kronecker factor w1 (-1: as square as the "
                               "layer allows)")
    lokr_full_matrix: bool = opt(False, "with --adapter lokr: keep w2 a whole matrix instead of a rank-r pair")
    rank: int = opt(16, "LoRA rank r")
    alpha: float | None = opt(None, "LoRA alpha; scale = alpha / rank (default: alpha = rank)")
    conv_rank: int | None = opt(None, "rank of 3x3 convolutions with --targets conv (default: rank)")
    conv_alpha: float | None = opt(None, "alpha of 3x3 convolutions (default: alpha)")
    train_text_encoder: bool = opt(False, "also adapt the text encoder(s) q/k/v/out projections")
    te_mlp: bool = opt(False, "with --train-text-encoder, also adapt the MLP fc1/fc2")
    init: str = opt("kaiming", "initialisation of A", ("kaiming", "gaussian"))
    lora_dropout: float = opt(0.0, "dropout on the adapter input")
    # pivotal tuning / textual inversion
    train_embedding: str | None = opt(None, "also train a new token TOKEN (textual inversion) in every text encoder, "
                                            "with the adapter (pivotal tuning): captions must contain it; saved in "
                                            "NAME.safetensors (A1111's bundled embedding) and NAME-emb.safetensors "
                                            "(default: none)")
    embedding_vectors: int = opt(1, "with --train-embedding: vectors of the token (TOKEN in a prompt stands for "
                                    "TOKEN TOKEN_1 ... as in A1111 and diffusers)")
    embedding_init: str = opt("*", "with --train-embedding: a word of one token whose embedding the vectors start "
                                   "from (A1111's default is *)")
    embedding_lr: float = opt(5e-3, "with --train-embedding: learning rate of the token's vectors (A1111's "
                                    "textual-inversion default)")
    embedding_only: bool = opt(False, "with --train-embedding: train only the token, no adapter (textual inversion)")
    # optimisation
    steps: int | None = opt(None, "training steps (default: 500 unless --epochs is given)")
    epochs: int | None = opt(None, "passes over the data (default: none, --steps counts)")
    batch_size: int = opt(4, "images per step (per process)")
    grad_accum: int = opt(1, "gradient accumulation steps")
    lr: float = opt(1e-4, "learning rate of the UNet adapter")
    text_encoder_lr: float | None = opt(None, "learning rate of the text-encoder adapter (default: --lr)")
    optimizer: str = opt("adamw", "optimizer (adamw8bit needs bitsandbytes, prodigy needs prodigyopt; adafactor: "
                                  "transformers' Adafactor at the given --lr, as kohya recommends it; schedulefree: "
                                  "schedule-free AdamW, needs --lr-scheduler constant, warms up by --warmup-steps "
                                  "itself, and samples, validates and saves its averaged weights)",
                         ("adamw", "adamw8bit", "prodigy", "adafactor", "schedulefree"))
    weight_decay: float = opt(1e-2, "AdamW weight decay")
    lr_scheduler: str = opt("constant", "learning-rate schedule", ("constant", "cosine", "linear"))
    warmup_steps: int = opt(0, "linear warm-up steps")
    max_grad_norm: float = opt(1.0, "gradient clipping (0: off)")
    loraplus_lr_ratio: float | None = opt(None, "LoRA+: the up factors (B, lora_up) train at this many times the "
                                                "rate of the down factors, UNet and text encoder alike (16 is the "
                                                "paper's; --adapter lora or dora; default: off)")
    ema: bool = opt(False, "keep an exponential moving average of the adapter weights: NAME.safetensors and the "
                           "samples use it, NAME-raw.safetensors holds the trained weights")
    ema_decay: float = opt(0.999, "with --ema: ema = decay * ema + (1 - decay) * weights at each update")
    ema_start_step: int = opt(0, "with --ema: until this step the average just follows the weights")
    ema_update_every: int = opt(1, "with --ema: update the average every N optimizer steps")
    seed: int = opt(0, "random seed: the same seed and data give the same adapter")
    mixed_precision: str = opt("no", "frozen base in half precision (adapters stay fp32)", ("no", "fp16", "bf16"))
    gradient_checkpointing: bool = opt(False, "recompute activations to save memory (slower)")
    compile: bool = opt(False, "compile the UNet with torch.compile: minutes of compiling first, for long GPU runs "
                               "(on CPU it measured slower than eager)")
    quantize_base: str | None = opt(None, "store the frozen UNet's Linear weights in int8 or fp8 (needs torchao; "
                                          "fp8 needs a GPU that has it; default: off)", ("int8", "fp8"))
    # data processing and loss
    resolution: int | None = opt(None, "training resolution (default: the model's native size)")
    bucket_step: int = opt(64, "aspect-ratio bucket side step in pixels")
    min_bucket: int | None = opt(None, "smallest bucket side (default: max(step, resolution/2))")
    max_bucket: int | None = opt(None, "largest bucket side (default: 2 x resolution)")
    no_upscale: bool = opt(False, "never upscale small images; give them their own bucket")
    crop: str = opt("center", "crop to the bucket", ("center", "random"))
    flip: bool = opt(False, "random horizontal flips")
    cache_latents: str = opt("memory", "encode images once", ("memory", "disk", "none"))
    cache_dir: str | None = opt(None, "disk latent cache folder (default: OUTPUT/.cache)")
    cache_text: bool = opt(True, "encode captions once when the text encoder is frozen and captions are fixed")
    min_snr_gamma: float | None = opt(None, "min-SNR loss weighting gamma (5 is common; default: off)")
    noise_offset: float = opt(0.0, "noise offset")
    multires_noise_iterations: int = opt(0, "multi-resolution (pyramid) noise: noise at up to N coarser scales "
                                            "added to the noise, as kohya (6 to 10 is common; 0: off)")
    multires_noise_discount: float = opt(0.3, "with --multires-noise-iterations: the weight of scale i is this "
                                              "to the power i")
    min_timestep: int = opt(0, "training timesteps are drawn from [--min-timestep, --max-timestep)")
    max_timestep: int | None = opt(None, "upper end of the training timesteps, excluded (default: the model's "
                                         "number of timesteps, 1000)")
    timestep_sampling: str = opt("uniform", "how training timesteps are drawn: uniform, or logit_normal (SD3's: "
                                            "more of the middle timesteps)", ("uniform", "logit_normal"))
    logit_mean: float = opt(0.0, "with --timestep-sampling logit_normal: the mean of the normal (above 0: noisier)")
    logit_std: float = opt(1.0, "with --timestep-sampling logit_normal: the std of the normal")
    timestep_bias: str = opt("none", "draw the earliest (detail) or latest (composition) --timestep-bias-portion "
                                     "of the timesteps --timestep-bias-multiplier times as often (diffusers' "
                                     "timestep_bias_strategy)", ("none", "earlier", "later"))
    timestep_bias_multiplier: float = opt(1.0, "with --timestep-bias: how much more often (below 1: less often)")
    timestep_bias_portion: float = opt(0.25, "with --timestep-bias: the share of the timesteps it favours")
    zero_terminal_snr: bool = opt(False, "rescale the noise schedule so its last step is pure noise (Lin et al. "
                                         "2023) and sample with the matching setting (trailing timesteps); needs "
                                         "a v-prediction model")
    debiased_estimation: bool = opt(False, "weight the loss by 1/sqrt(SNR) (v-prediction: 1/(SNR+1)), as kohya's "
                                           "--debiased_estimation_loss")
    loss: str = opt("l2", "loss function: l2 (MSE), l1, or kohya's huber and smooth_l1 (robust to outliers)",
                    ("l2", "l1", "huber", "smooth_l1"))
    huber_c: float = opt(0.1, "with --loss huber or smooth_l1: the threshold c (its value at the noisiest step "
                              "with --huber-schedule exponential or snr)")
    huber_schedule: str = opt("snr", "with --loss huber or smooth_l1: c over the timesteps, as kohya: constant, "
                                     "exponential (from 1 down to c) or snr (from about 1 at clean steps down to c)",
                              ("constant", "exponential", "snr"))
    caption_dropout: float = opt(0.0, "probability of training a sample with an empty caption")
    shuffle_captions: bool = opt(False, "shuffle comma-separated tags")
    keep_tokens: int = opt(0, "leading tags kept in place when shuffling")
    masked_loss: bool = opt(False, "weight the loss per pixel by a mask (white: trains, black: ignored, grey: in "
                                   "between), from --mask-dir or --alpha-mask; images without one train whole")
    mask_dir: str | None = opt(None, "with --masked-loss: folder of masks named as the images (DIR/stem.png, any "
                                     "image type; subfolders mirror --data's), greyscale (default: none)")
    alpha_mask: bool = opt(False, "with --masked-loss: each image's own alpha channel is its mask")
    mask_floor: float = opt(0.0, "with --masked-loss: the least weight a pixel gets, so black regions still train a "
                                 "little (OneTrainer's unmasked weight)")
    device: str | None = opt(None, "cpu or cuda (default: accelerate's choice)")
    workers: int = opt(2, "threads for image decoding")
    log_every: int = opt(1, "log loss every N steps")

    def __post_init__(self):
        if self.sample_prompts is None:
            self.sample_prompts = []

    def check(self) -> None:
        """Cross-field checks, after defaults, TOML and flags are merged."""
        if not self.data:
            raise ImgloraError("no training data given", "pass --data FOLDER (or data = \"...\" in the TOML)")
        if self.steps is not None and self.epochs is not None:
            raise ImgloraError("both --steps and --epochs given", "choose one")
        for name, (lo, hi, lo_open) in RANGES.items():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, float) and not math.isfinite(value):
                raise ImgloraError(f"{_flag(name)} must be a finite number, got {value}")
            if (value <= lo if lo_open else value < lo) or (hi is not None and value > hi):
                bound = f"{'above' if lo_open else 'at least'} {lo}" + (f" and at most {hi}" if hi is not None else "")
                raise ImgloraError(f"{_flag(name)} must be {bound}, got {value}", _RANGE_FIX.get(name, ""))
        for name in ("resolution", "bucket_step", "min_bucket", "max_bucket"):
            value = getattr(self, name)
            if value is not None and value % 8:
                raise ImgloraError(f"{_flag(name)} {value} is not a multiple of 8",
                                   "image sides must be multiples of 8 to make a latent (the VAE shrinks 8x)")
        if self.resolution is not None and self.resolution < self.bucket_step:
            raise ImgloraError(f"--resolution {self.resolution} is smaller than --bucket-step {self.bucket_step}",
                               "lower --bucket-step or raise --resolution")
        if self.min_bucket and self.max_bucket and self.min_bucket > self.max_bucket:
            raise ImgloraError("--min-bucket is larger than --max-bucket", "swap them")
        if self.save_precision == "fp16":
            alphas = [a for a in (self.alpha, self.conv_alpha) if a is not None] or [self.rank]
            if max(alphas) > 65504:  # it would be saved as inf: a run lost at its very end
                raise ImgloraError(f"alpha {max(alphas):g} does not fit --save-precision fp16 (largest 65504)",
                                   "use --save-precision bf16 or fp32, or a smaller --alpha")
        self._check_embedding()
        if self.reg_uncond and not self.reg_data:
            raise ImgloraError("--reg-uncond needs --reg-data",
                               "it trains regularisation images with the empty caption")
        if self.lora_dropout and self.adapter != "lora":
            raise ImgloraError(f"--lora-dropout works with --adapter lora, not {self.adapter}", "leave it out")
        if self.adapter != "lokr" and (self.lokr_factor != -1 or self.lokr_full_matrix):
            raise ImgloraError("--lokr-factor and --lokr-full-matrix need --adapter lokr")
        if self.masked_loss and bool(self.mask_dir) == self.alpha_mask:
            raise ImgloraError("--masked-loss needs one source of masks" if not self.mask_dir else
                               "--mask-dir and --alpha-mask both given", "pass --mask-dir DIR or --alpha-mask")
        if not self.masked_loss and (self.mask_dir or self.alpha_mask or self.mask_floor):
            raise ImgloraError("--mask-dir, --alpha-mask and --mask-floor need --masked-loss", "add --masked-loss")
        if self.crop == "random" and self.cache_latents != "none":
            raise ImgloraError("--crop random needs fresh crops every epoch, so latents cannot be cached",
                               "add --cache-latents none, or use --crop center")
        self._check_methods()

    def _check_embedding(self) -> None:
        """The textual-inversion options; the checks that need the tokenizer come when the model is loaded."""
        token = self.train_embedding
        if token is None:
            unused = [_flag(k) for k in ("embedding_vectors", "embedding_init", "embedding_lr", "embedding_only")
                      if getattr(self, k) != FIELDS[k].default]
            if unused:
                raise ImgloraError(f"{' and '.join(unused)} need{'s' if len(unused) == 1 else ''} --train-embedding "
                                   "TOKEN")
            return
        if not token or token != token.lower() or "." in token or any(c.isspace() for c in token):
            raise ImgloraError(f"--train-embedding {token!r} must be one lower-case word without dots",
                               "CLIP lower-cases prompts, and A1111's bundled-embedding keys split at dots")
        if self.embedding_only and self.train_text_encoder:
            raise ImgloraError("--embedding-only trains no adapter, so --train-text-encoder has nothing to train",
                               "leave out one of them")

    def _check_methods(self) -> None:
        """Timesteps, noise, loss, LoRA+, the optimizers' needs and EMA: an option given without the one it
        belongs to is an error, never silently ignored."""

        def given(*names):
            """'--a and --b need' / '--a needs' for those of `names` not at their defaults ('' if none)."""
            flags = [_flag(k) for k in names if getattr(self, k) != FIELDS[k].default]
            return f"{' and '.join(flags)} need{'s' if len(flags) == 1 else ''}" if flags else ""

        if self.max_timestep is not None and self.min_timestep >= self.max_timestep:
            raise ImgloraError(f"--min-timestep {self.min_timestep} is not below --max-timestep {self.max_timestep}",
                               "timesteps are drawn from [min, max): make --max-timestep larger")
        if self.timestep_sampling != "logit_normal" and given("logit_mean", "logit_std"):
            raise ImgloraError(f"{given('logit_mean', 'logit_std')} --timestep-sampling logit_normal")
        if self.timestep_bias == "none" and given("timestep_bias_multiplier", "timestep_bias_portion"):
            raise ImgloraError(f"{given('timestep_bias_multiplier', 'timestep_bias_portion')} "
                               "--timestep-bias earlier or later")
        if self.loss not in ("huber", "smooth_l1") and given("huber_c", "huber_schedule"):
            raise ImgloraError(f"{given('huber_c', 'huber_schedule')} --loss huber or smooth_l1")
        if not self.multires_noise_iterations and given("multires_noise_discount"):
            raise ImgloraError("--multires-noise-discount needs --multires-noise-iterations N")
        if self.loraplus_lr_ratio is not None and self.adapter not in ("lora", "dora"):
            raise ImgloraError(f"--loraplus-lr-ratio works with --adapter lora or dora, not {self.adapter}",
                               "LoRA+ speeds up the up factor of a low-rank pair (kohya and LyCORIS apply it to "
                               "lora_up only); leave it out")
        if self.optimizer == "schedulefree" and self.lr_scheduler != "constant":
            raise ImgloraError(f"--optimizer schedulefree replaces the schedule; --lr-scheduler {self.lr_scheduler} "
                               "would fight it", "use --lr-scheduler constant (--warmup-steps still warms up)")
        if not self.ema and given("ema_decay", "ema_start_step", "ema_update_every"):
            raise ImgloraError(f"{given('ema_decay', 'ema_start_step', 'ema_update_every')} --ema")
        if self.ema and self.ema_decay >= 1:
            raise ImgloraError(f"--ema-decay must be below 1, got {self.ema_decay}", "0.999 is common")
        if self.ema and self.optimizer == "schedulefree":
            raise ImgloraError("--ema with --optimizer schedulefree: schedule-free already ships an average of "
                               "the weights", "leave out --ema, or use another optimizer")


def _flag(name: str) -> str:
    return FIELDS[name].metadata.get("flag") or "--" + name.replace("_", "-")


# Numeric ranges, checked before anything is loaded: name -> (low, high or None, low excluded).
RANGES = {
    "steps": (1, None, False), "epochs": (1, None, False), "batch_size": (1, None, False),
    "grad_accum": (1, None, False), "rank": (1, 4096, False), "conv_rank": (1, 4096, False),
    "alpha": (0, None, True), "conv_alpha": (0, None, True), "lr": (0, 10, True), "text_encoder_lr": (0, 10, True),
    "weight_decay": (0, 10, False), "warmup_steps": (0, None, False), "max_grad_norm": (0, None, False),
    "lora_dropout": (0, 0.99, False), "seed": (0, 2**63 - 1, False), "val_count": (0, None, False),
    "val_every": (0, None, False), "sample_every": (0, None, False), "save_every": (0, None, False),
    "log_every": (1, None, False), "keep_last": (1, None, False), "prior_loss_weight": (0, None, False),
    "reg_uncond": (0, 1, False),
    "noise_offset": (0, 1, False), "min_snr_gamma": (0, None, True), "caption_dropout": (0, 0.99, False),
    "keep_tokens": (0, None, False), "workers": (1, 256, False), "max_bad": (0, 1, False),
    "mask_floor": (0, 1, False),
    "min_timestep": (0, None, False), "max_timestep": (1, None, False), "logit_mean": (-10, 10, False),
    "logit_std": (0, 10, True), "timestep_bias_multiplier": (0, 1000, True), "timestep_bias_portion": (0, 1, True),
    "multires_noise_iterations": (0, 100, False), "multires_noise_discount": (0, 1, True), "huber_c": (0, 1, True),
    "loraplus_lr_ratio": (0, 1000, True), "ema_decay": (0, 1, True), "ema_start_step": (0, None, False),
    "ema_update_every": (1, None, False),
    "min_image_side": (1, None, False), "sample_steps": (1, 1000, False), "sample_guidance": (0, 100, False),
    "resolution": (8, 8192, False), "bucket_step": (8, None, False), "min_bucket": (8, None, False),
    "max_bucket": (8, None, False),
    "embedding_vectors": (1, 64, False), "embedding_lr": (0, 10, True),
}
_RANGE_FIX = {"alpha": "alpha 0 trains nothing: the update is scaled by alpha/rank (default alpha = rank)",
              "conv_alpha": "alpha 0 trains nothing: the update is scaled by alpha/rank",
              "steps": "give at least one step, or leave --steps out for the default 500",
              "epochs": "give at least one epoch", "lr": "typical LoRA rates are 1e-5 to 1e-3 (Prodigy: 1.0)"}


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

# The sections of `imglora train --help`, in order; every field is in exactly one.
HELP_GROUPS = {
    "data": ("data", "reg_data", "prior_loss_weight", "reg_uncond", "caption_extension", "caption_fallback",
             "trigger", "max_bad", "min_image_side", "val_count", "resolution", "bucket_step", "min_bucket",
             "max_bucket", "no_upscale",
             "crop", "flip", "caption_dropout", "shuffle_captions", "keep_tokens", "masked_loss", "mask_dir",
             "alpha_mask", "mask_floor"),
    "model": ("model", "model_config", "device"),
    "adapter": ("adapter", "lokr_factor", "lokr_full_matrix", "targets", "rank", "alpha", "conv_rank", "conv_alpha", "train_text_encoder", "te_mlp", "init",
                "lora_dropout", "train_embedding", "embedding_vectors", "embedding_init", "embedding_lr",
                "embedding_only"),
    "optimisation": ("steps", "epochs", "batch_size", "grad_accum", "lr", "text_encoder_lr", "optimizer",
                     "weight_decay", "lr_scheduler", "warmup_steps", "max_grad_norm", "loraplus_lr_ratio", "ema",
                     "ema_decay", "ema_start_step", "ema_update_every", "loss", "huber_c", "huber_schedule",
                     "min_snr_gamma", "debiased_estimation", "noise_offset", "multires_noise_iterations",
                     "multires_noise_discount", "min_timestep", "max_timestep", "timestep_sampling", "logit_mean",
                     "logit_std", "timestep_bias", "timestep_bias_multiplier", "timestep_bias_portion",
                     "zero_terminal_snr", "seed"),
    "speed and memory": ("mixed_precision", "gradient_checkpointing", "compile", "quantize_base", "cache_latents",
                         "cache_dir", "cache_text", "workers"),
    "output": ("output", "name", "save_format", "save_precision", "overwrite", "log_every"),
    "sampling": ("sample_every", "sample_prompts", "sample_prompts_file", "sample_steps", "sample_guidance",
                 "val_every"),
    "resume": ("resume", "save_every", "keep_last"),
}


def _base_type(tp):
    """str | None -> str; list[str] -> list."""
    tp = typing.get_type_hints(TrainConfig)[tp] if isinstance(tp, str) else tp
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is list:
        return list
    return args[0] if args and typing.get_origin(tp) is not None else tp


def _check_type(key: str, value):
    want = _base_type(key)
    if value is None:
        return value
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ImgloraError(f"config key {key!r} must be {want.__name__}, got {type(value).__name__} {value!r}",
                           "fix the TOML value")
    choices = FIELDS[key].metadata.get("choices")
    if choices and value not in choices:
        raise ImgloraError(f"config key {key!r} must be one of {', '.join(choices)}, got {value!r}")
    return value


def help_text(f: dataclasses.Field) -> str:
    """The field's help with its default written in: the parser's defaults are None, so argparse cannot show it."""
    text = f.metadata["help"]
    if f.default is not None:
        text += f" (default: {('on' if f.default else 'off') if isinstance(f.default, bool) else f.default})"
    return text.replace("%", "%%")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field, in HELP_GROUPS' sections; defaults are None so that only flags actually given override
    the TOML."""
    parser.add_argument("--config", help="TOML file whose keys are these flags' names (with _ for -); "
                                         "flags given as well override it")
    hints = typing.get_type_hints(TrainConfig)
    for title, names in HELP_GROUPS.items():
        group = parser.add_argument_group(title)
        for name in names:
            f = FIELDS[name]
            flag = f.metadata.get("flag") or "--" + name.replace("_", "-")
            tp = _base_type(hints[name])
            kwargs = {"dest": name, "default": None, "help": help_text(f)}
            if tp is bool:
                # --x/--no-x; a field already named no_x is a plain switch, not --no-x/--no-no-x
                action = "store_true" if name.startswith("no_") else argparse.BooleanOptionalAction
                group.add_argument(flag, action=action, **kwargs)
            elif tp is list:
                group.add_argument(flag, action="append", **kwargs)
            else:
                group.add_argument(flag, type=tp, choices=f.metadata.get("choices"), **kwargs)


def config_values(toml: dict, path=None) -> dict:
    """TOML keys (with - or _) as field values: an unknown key or a wrong type is an error naming the key."""
    values = {}
    for key, value in toml.items():
        key = key.replace("-", "_")
        if key not in FIELDS:
            raise ImgloraError(f"unknown config key {key!r}", "see `imglora train --help` for the keys", path=path)
        try:
            values[key] = _check_type(key, value)
        except ImgloraError as e:
            raise ImgloraError(e.what, e.fix, path=path) from None
    return values


def to_toml(values: dict) -> str:
    """Field values as the TOML `--config` reads, in HELP_GROUPS' order (None values are left out: their
    default). json.dumps of a str, an int or a finite float is also valid TOML."""
    lines = []
    for title, names in HELP_GROUPS.items():
        here = [(n, values[n]) for n in names if values.get(n) is not None]
        if here:
            lines.append(f"# {title}")
        for name, value in here:
            text = str(value).lower() if isinstance(value, bool) else json.dumps(value, ensure_ascii=False)
            lines.append(f"{name} = {text}")
    return "\n".join(lines) + "\n"


def load_config(args: argparse.Namespace) -> TrainConfig:
    values: dict = {}
    if args.config:
        path = Path(args.config)
        try:
            toml = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise ImgloraError(f"cannot read ({e.strerror})", "check the path", path=path) from None
        except UnicodeDecodeError as e:
            raise ImgloraError(f"not UTF-8 text (byte {e.start})", "save the file as UTF-8", path=path) from None
        except tomllib.TOMLDecodeError as e:
            raise ImgloraError(f"invalid TOML ({e})", "fix the syntax", path=path) from None
        values = config_values(toml, path)
    for key in FIELDS:
        value = getattr(args, key, None)
        if value is not None:
            values[key] = value
    cfg = TrainConfig(**values)
    cfg.check()
    return cfg


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)

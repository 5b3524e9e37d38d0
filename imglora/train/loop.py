"""`train(cfg)`: setup, data, models, adapter, caches, optimizer; then resume, the steps, and the final save.

The batch side (epoch order, caches, building a batch) is train/batches.py.

One process or many under `accelerate launch` (DDP); only the main process writes files. Every step's
randomness is seeded by (seed, step), and the data order by (seed, epoch), so a resumed run ends with
exactly the adapter an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import signal
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import FIELDS, TrainConfig, to_dict
from ..errors import ImgloraError
from ..formats.embeddings import read_bundled, standalone_tensors
from ..formats.files import atomic_write, clean_temp_files, write_safetensors
from ..formats.lora_file import load_adapter, save_adapter
from ..formats.metadata import build_metadata, training_metadata
from ..lora.adapters import Adapters
from ..models.load import native_resolution
from ..pipeline import load_model
from . import checkpoint as ckpt
from . import embeddings as emb
from .batches import Batches
from .output import OutputLock, check_output, resume_command
from .data import TrainData, bucket_histogram, build_data
from .ema import EMA, shipped_weights
from .loss import LossOptions, diffusion_loss, training_scheduler, zero_snr_sampler
from .optim import make_optimizer, make_schedule, param_groups, up_factors
from .quantize import quantize_frozen
from .samples import RunLog, read_sample_prompts, render_samples, validation_loss

NAME = "train"  # the adapter's name inside the pipeline; the file name is cfg.name
# A checkpoint only continues the same run: these must match (RELIABILITY.md T4).
RESUME_KEYS = ("model", "adapter", "lokr_factor", "lokr_full_matrix", "targets", "rank", "alpha", "conv_rank", "conv_alpha", "train_text_encoder", "te_mlp",
               "batch_size", "grad_accum", "resolution", "seed", "init", "flip", "crop", "caption_dropout",
               "shuffle_captions", "keep_tokens", "noise_offset", "val_count", "masked_loss", "alpha_mask",
               "mask_floor", "min_timestep", "max_timestep", "timestep_sampling", "logit_mean", "logit_std",
               "timestep_bias", "timestep_bias_multiplier", "timestep_bias_portion", "zero_terminal_snr",
               "multires_noise_iterations", "multires_noise_discount", "optimizer", "loraplus_lr_ratio", "ema",
               "ema_decay", "ema_start_step", "ema_update_every", "train_embedding", "embedding_vectors",
               "embedding_init", "embedding_only", "reg_uncond")
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def step_seed(seed: int, index: int) -> int:
    return int(hashlib.sha256(f"{seed}/{index}".encode()).hexdigest()[:15], 16)


class Interrupt:
    """Ctrl-C asks for a checkpoint at the end of the current step; a second Ctrl-C is ignored meanwhile."""

    def __init__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, *_):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGINT, self.previous)


class Trainer:
    def __init__(self, cfg: TrainConfig, full_finetune: bool = False):
        """full_finetune: every UNet weight trains instead of an adapter (a reference for benchmarks)."""
        from accelerate import Accelerator

        self.cfg = cfg
        self.full_finetune = full_finetune
        # -- Setup: the accelerator decides the device and, under `accelerate launch`, the process group.
        self.acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.device == "cpu")
        self.main = self.acc.is_main_process
        self.out = Path(cfg.output)
        self.ckpt_root = self.out / "checkpoints"
        self.final = self.out / f"{cfg.name}.safetensors"
        check_output(self.out, cfg)
        if self.final.exists() and not (cfg.overwrite or cfg.resume):
            raise ImgloraError("already exists", "pass --overwrite to replace it, or --resume latest to continue",
                               path=self.final)
        self.lock = OutputLock(self.out if self.main else None)  # before anything reads or prunes its files
        try:
            self._setup()
        except BaseException:
            self.lock.release()
            raise

    def _setup(self):
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        # Everything that can be checked is checked before step 1: a finished run is never lost to it.
        self.sample_prompts = read_sample_prompts(cfg.sample_prompts, cfg.sample_prompts_file)
        # The data is checked before the (possibly large) model is loaded: a bad folder fails fast.
        self.resolution = cfg.resolution or native_resolution(cfg.model, cfg.model_config) or 512
        self._load_data()
        self._load_models()
        # Only a run that got this far writes anything: a bad dataset leaves no output folder behind.
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
            clean_temp_files(self.out)
            ckpt.clean_partial(self.ckpt_root)
        self.log = RunLog(self.out / "logs", self.main, resume=bool(cfg.resume))
        self._make_adapter()
        self._fill_caches()
        self._make_optimizer()

    def say(self, text: str) -> None:
        if self.main:
            tqdm.write(text)

    # -- Models ---------------------------------------------------------------------------------
    def _load_models(self):
        cfg, device = self.cfg, self.acc.device
        self.model = load_model(cfg.model, config=cfg.model_config)
        self.pipe, self.arch, self.prediction = self.model.pipe, self.model.arch, self.model.prediction
        self._noise_schedule()
        self.dtype = DTYPES[cfg.mixed_precision]
        self.text_encoders = [m for m in (self.pipe.text_encoder, getattr(self.pipe, "text_encoder_2", None)) if m]
        for m in [self.pipe.unet, self.pipe.vae, *self.text_encoders]:
            m.requires_grad_(False)
            m.eval()
        # Frozen weights in half precision; the adapters stay float32 (PERFORMANCE.md §4.3).
        self.pipe.unet.to(device, self.dtype)
        self.channels_last = device.type == "cuda"  # cuDNN's fast convolution layout (PERFORMANCE.md §4.6)
        if self.channels_last:
            self.pipe.unet.to(memory_format=torch.channels_last)
            torch.backends.cuda.matmul.allow_tf32 = True  # the float32 adapter math
        for te in self.text_encoders:
            te.to(device, self.dtype)
        if cfg.quantize_base:
            quantize_frozen(self.pipe.unet, cfg.quantize_base)
        upcast = getattr(self.pipe.vae.config, "force_upcast", True)
        self.pipe.vae.to(device, torch.float32 if upcast else self.dtype)
        if cfg.gradient_checkpointing:
            self.pipe.unet.enable_gradient_checkpointing()
            if cfg.train_text_encoder:
                for te in self.text_encoders:
                    te.gradient_checkpointing_enable()
        self._add_embedding()

    def _add_embedding(self):
        """--train-embedding: the new token, with trainable vectors in every text encoder (train/embeddings.py).
        Checked here, before the output folder exists: a token the tokenizer has, a bad init word."""
        cfg = self.cfg
        self.emb_params: dict[str, torch.nn.Parameter] = {}
        if not cfg.train_embedding:
            return
        start = emb.init_vectors(self.pipe, cfg.embedding_init, cfg.embedding_vectors)
        self.emb_params = emb.add_trainable(self.pipe, cfg.train_embedding, start)
        if not emb.mentions(self.pipe, cfg.train_embedding, [e.caption for e in self.data.examples]):
            raise ImgloraError(f"no caption contains the token {cfg.train_embedding!r}, so it would never train",
                               f"put it in the captions, or add --trigger {cfg.train_embedding}", path=cfg.data)

    def _embeddings(self) -> dict:
        """The trained token as formats/embeddings.py holds it: {token: {component: (vectors, width)}}."""
        if not self.emb_params:
            return {}
        return {self.cfg.train_embedding: {c: p.detach().float().cpu().clone() for c, p in self.emb_params.items()}}

    def _noise_schedule(self):
        """The schedule training adds noise with (loss.training_scheduler), the loss options, and with
        --zero-terminal-snr the samplers' matching setting."""
        cfg = self.cfg
        if cfg.zero_terminal_snr:
            if self.prediction != "v_prediction":
                # At ᾱ = 0 an epsilon model's x0 = (x - sqrt(1-ᾱ)·ε)/sqrt(ᾱ) is 0/0: its first sampling step
                # from pure noise is undefined (kohya only warns; the samples then come out broken).
                raise ImgloraError("--zero-terminal-snr needs a v-prediction model; this one predicts epsilon",
                                   "use a v-prediction model (SD 2.x 768-v, a v-pred SDXL) or leave it out",
                                   path=cfg.model)
            self.pipe.scheduler = zero_snr_sampler(self.pipe.scheduler)
        self.noise_scheduler = training_scheduler(self.pipe.scheduler.config, cfg.zero_terminal_snr)
        self.loss_options = LossOptions.from_config(cfg, self.prediction,
                                                    self.noise_scheduler.config.num_train_timesteps)

    # -- Data -----------------------------------------------------------------------------------
    def _load_data(self):
        cfg = self.cfg
        self.data: TrainData = build_data(cfg, self.resolution, log=self.say)
        if not self.data.examples:
            raise ImgloraError("no usable training images", "see the skipped files above", path=cfg.data)
        if cfg.reg_uncond:
            # Copies with the empty caption: an adapter whose change also shows for no prompt at all has that
            # part subtracted again by classifier-free guidance, at the concept's expense.
            reg = Path(cfg.reg_data).resolve()
            regs = [e for e in self.data.examples if e.path.resolve().is_relative_to(reg)]
            regs = regs[:round(cfg.reg_uncond * len(regs))]
            self.data.examples += [dataclasses.replace(e, caption="") for e in regs]
        self.batches = Batches(cfg, self.data, self.say)
        self.world = self.acc.num_processes
        per_step = self.world * cfg.grad_accum  # batches consumed by one optimizer step, all processes
        per_epoch = self.batches.per_epoch
        self.total_steps = cfg.steps or (math.ceil(cfg.epochs * per_epoch / per_step) if cfg.epochs else 500)
        self.say(f"{len({e.path for e in self.data.examples})} images ({len(self.data.examples)} with repeats), "
                 f"{len(self.data.problems)} skipped, {len(self.data.val)} held out; buckets: "
                 f"{bucket_histogram(self.data)}; {self.total_steps} steps = "
                 f"{self.total_steps * per_step / per_epoch:.1f} epochs"
                 + (f" on {self.world} processes" if self.world > 1 else ""))

    # -- Adapters -------------------------------------------------------------------------------
    def _make_adapter(self):
        cfg = self.cfg
        self.adapters = Adapters(self.pipe)
        self.emb_list = list(self.emb_params.values())
        if self.full_finetune:  # the reference LoRA is measured against (benchmarks/quality.py): no adapter
            self.pipe.unet.requires_grad_(True)
            self.unet_params, self.te_params = list(self.pipe.unet.parameters()), []
            self.say(f"full fine-tune: {sum(p.numel() for p in self.unet_params):,} trainable parameters")
            return
        keys = [] if cfg.embedding_only else \
            self.adapters.targets(cfg.targets, text_encoder=cfg.train_text_encoder, te_mlp=cfg.te_mlp)
        options = {"factor": cfg.lokr_factor, "full_matrix": cfg.lokr_full_matrix} if cfg.adapter == "lokr" else {}
        self.adapters.create(NAME, keys, rank=cfg.rank, alpha=cfg.alpha, conv_rank=cfg.conv_rank,
                             conv_alpha=cfg.conv_alpha, init=cfg.init, dropout=cfg.lora_dropout, kind=cfg.adapter,
                             **options)
        named = self.adapters.named_parameters(NAME)
        self.unet_params = [p for k, p in named.items() if k.startswith("unet.")]
        self.te_params = [p for k, p in named.items() if not k.startswith("unet.")]
        n = sum(p.numel() for p in named.values())
        if keys:
            self.say(f"adapter: {cfg.adapter}, {len(keys)} modules ({cfg.targets}"
                     f"{' + text encoder' if self.te_params else ''}), rank {cfg.rank}, {n:,} trainable parameters")
        if self.emb_list:
            self.say(f"embedding: {cfg.train_embedding!r}, {cfg.embedding_vectors} vector(s) from "
                     f"{cfg.embedding_init!r} in {len(self.emb_list)} text encoder(s), "
                     f"{sum(p.numel() for p in self.emb_list):,} trainable parameters")

    # -- Caches ---------------------------------------------------------------------------------
    def _fill_caches(self):
        if self.emb_list:  # the token's vectors change every step: captions are encoded afresh, never cached
            self.batches.cfg = dataclasses.replace(self.batches.cfg, cache_text=False)
        self.batches.prepare(self.pipe, self.arch, self.acc.device, self.dtype, self.channels_last,
                             text_trains=bool(self.te_params or self.emb_list), out=self.out,
                             micro_batches=self.total_steps * self.cfg.grad_accum * self.world, progress=self.main)
        self._offload_cached_encoders()

    def _offload_cached_encoders(self) -> None:
        """Models whose outputs are cached have nothing to do until sampling: free their device memory."""
        if self.acc.device.type == "cpu":
            return
        if self.batches.latents is not None:
            self.pipe.vae.to("cpu")
        if self.batches.text_cache is not None:
            for te in self.text_encoders:
                te.to("cpu")

    # -- Optimizer ------------------------------------------------------------------------------
    def _make_optimizer(self):
        cfg = self.cfg
        self.trained = self._checkpointed()  # the adapter and the token's vectors; {} in a full fine-tune
        groups = param_groups(self.unet_params, self.te_params, cfg.lr, cfg.text_encoder_lr or cfg.lr,
                              cfg.loraplus_lr_ratio, up_factors(self.trained))
        if self.emb_list:  # no weight decay: it would pull the vectors towards 0, off the scale of real words
            groups.append({"name": "embedding", "params": self.emb_list, "lr": cfg.embedding_lr, "weight_decay": 0.0})
        self.group_names, self.group_lrs = [g["name"] for g in groups], [g["lr"] for g in groups]
        # Schedule-free warms up inside the optimizer, its schedule stays constant (config.check).
        self.schedule_free = cfg.optimizer == "schedulefree"
        warmup = 0 if self.schedule_free else cfg.warmup_steps
        self.optimizer = make_optimizer(cfg.optimizer, groups, cfg.weight_decay, self.acc.device.type,
                                        warmup_steps=cfg.warmup_steps)
        self.schedule = make_schedule(self.optimizer, cfg.lr_scheduler, warmup, self.total_steps)
        self.ema = (EMA(self._checkpointed(), cfg.ema_decay, cfg.ema_start_step, cfg.ema_update_every)
                    if cfg.ema else None)
        # DDP wraps the UNet (the LoraLayers inside are the same objects). The text encoders run inside
        # the pipeline's encode_prompt, not through a wrapper, so their adapter gradients are averaged
        # by hand (see train_step).
        if cfg.compile:  # in place, after the adapters are attached: the graphs include them
            self.pipe.unet.compile()
        unet, self.optimizer = self.acc.prepare(self.pipe.unet, self.optimizer)
        self.models = [unet]
        self.step = 0

    # -- One optimizer step ---------------------------------------------------------------------
    def loss(self, batch, generator, **fixed) -> torch.Tensor:
        with self.acc.autocast():
            return diffusion_loss(self.models[0], self.noise_scheduler, batch["latents"], batch["embeds"], generator,
                                  options=self.loss_options, sample_weights=batch["weights"],
                                  pooled=batch.get("pooled"), time_ids=batch.get("time_ids"), mask=batch.get("mask"),
                                  **fixed)

    def train_step(self) -> float:
        cfg = self.cfg
        total = 0.0
        for micro in range(cfg.grad_accum):
            g = (self.step * cfg.grad_accum + micro) * self.world + self.acc.process_index
            seed = step_seed(cfg.seed, g)
            torch.manual_seed(seed)  # adapter dropout
            generator = torch.Generator().manual_seed(seed)
            batch = self.batches.make(self.batches.examples(g), g, generator)
            last = micro == cfg.grad_accum - 1
            with contextlib.ExitStack() as stack:
                if not last:  # gradients are all-reduced once per optimizer step, not per micro-batch
                    for m in self.models:
                        stack.enter_context(self.acc.no_sync(m))
                loss = self.loss(batch, generator) / cfg.grad_accum
                self.acc.backward(loss)
            total += loss.detach()
        if self.world > 1 and (self.te_params or self.emb_list):
            for p in self.te_params + self.emb_list:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)  # a sum (gloo has no average)
                    p.grad /= self.world
        if cfg.max_grad_norm:
            self.acc.clip_grad_norm_(self.unet_params + self.te_params + self.emb_list, cfg.max_grad_norm)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.step)
        return float(self.acc.reduce(total, "mean") if self.world > 1 else total)

    # -- Validation and samples -----------------------------------------------------------------
    def shipped(self):
        """Context: the weights the run ships (the EMA, or schedule-free's average) in place of the trained
        ones, for validation, samples and the final file; the trained ones come back exactly."""
        # Everything the optimizer moves is restored (schedule-free's eval() moves all of it).
        moved = {str(i): p for i, p in enumerate(p for g in self.optimizer.param_groups for p in g["params"])}
        return shipped_weights(moved, self.ema, self.optimizer if self.schedule_free else None, self.adapters.changed)

    def validate(self) -> float | None:
        if not self.data.val:
            return None
        self.adapters.changed()  # the optimizer updated the adapter in place
        T = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.linspace(T * 0.1, T * 0.9, 4).long()
        held_out = []
        for i, e in enumerate(self.data.val):
            generator = torch.Generator().manual_seed(step_seed(self.cfg.seed, -1 - i))
            batch = self.batches.make([e] * len(timesteps), None, generator)
            batch["noise"] = torch.randn(batch["latents"].shape, generator=generator)
            held_out.append(batch)
        with self.shipped():
            return validation_loss(held_out, lambda b: self.loss(b, None, timesteps=timesteps, noise=b["noise"]))

    def samples(self) -> None:
        cfg = self.cfg
        if not self.sample_prompts or not self.main:
            return
        try:
            self.adapters.changed()
            self.pipe.unet.eval()
            self.pipe.to(self.acc.device)
            with self.shipped(), self.acc.autocast():
                path = render_samples(self.model, self.adapters, NAME, cfg.name, self.sample_prompts,
                                      self.out / "samples", self.step, cfg.seed, cfg.sample_steps,
                                      cfg.sample_guidance, self.resolution)
            self.say(f"samples: {path}")
        except Exception as e:  # a failed sample must never cost the run (RELIABILITY.md T8)
            self.say(f"warning: sampling failed at step {self.step}: {e}")
        finally:
            self.pipe.unet.train()
            self._offload_cached_encoders()

    # -- Checkpoints ----------------------------------------------------------------------------
    def _resume_identity(self) -> dict:
        return {**{k: getattr(self.cfg, k) for k in RESUME_KEYS}, "data": self.data.fingerprint()}

    def save_checkpoint(self) -> None:
        self.acc.wait_for_everyone()
        if self.main:
            adapter = {k: p.detach().float().cpu() for k, p in self._checkpointed().items()}
            state = {"step": self.step, "identity": self._resume_identity(), "schedule": self.schedule.state_dict(),
                     "scaler": self.acc.scaler.state_dict() if self.acc.scaler else None}
            path = ckpt.save_checkpoint(self.ckpt_root, self.step, adapter, self.optimizer, state, self.cfg.keep_last,
                                        ema=self.ema.state_dict() if self.ema is not None else None)
            self.say(f"checkpoint: {path}")
        self.last_saved = self.step
        self.acc.wait_for_everyone()

    def _checkpointed(self) -> dict[str, torch.nn.Parameter]:
        """What a checkpoint holds: the adapter's tensors and the token's vectors (`embedding.<component>`,
        a name no adapter layer has)."""
        return {**self.adapters.named_parameters(NAME), **{f"embedding.{c}": p for c, p in self.emb_params.items()}}

    def resume(self) -> None:
        path, adapter, optimizer, state = ckpt.find_and_load(self.ckpt_root, self.cfg.resume, warn=self.say)
        mine, theirs = self._resume_identity(), state["identity"]
        # A key an older checkpoint lacks had its default then.
        theirs = {**{k: FIELDS[k].default for k in RESUME_KEYS if k not in theirs}, **theirs}
        diffs = [f"{k}: {theirs.get(k)!r} -> {mine.get(k)!r}" for k in mine if theirs.get(k) != mine.get(k)]
        if diffs:
            raise ImgloraError(f"the checkpoint is from a different run ({'; '.join(diffs)})",
                               "resume with the same settings and data, or start a new --output", path=path)
        params = self._checkpointed()
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(adapter[k])
        if self.ema is not None:  # "ema" is in RESUME_KEYS: a run with --ema resumes from a checkpoint with one
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(optimizer)
        self.schedule.load_state_dict(state["schedule"])
        if state.get("scaler") and self.acc.scaler:
            self.acc.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.say(f"resumed from {path} at step {self.step}")
        self._apply_changed_rates()

    def _apply_changed_rates(self) -> None:
        """A resumed optimizer brings the checkpoint's learning rates and weight decay. A different --lr,
        --text-encoder-lr or --weight-decay given now applies from this step on, and says so: never a new
        value recorded in the metadata while the old one trains."""
        flags = {"unet": "--lr", "text_encoder": "--text-encoder-lr", "embedding": "--embedding-lr"}  # a LoRA+
        # group follows its rate quietly
        for i, (group, lr) in enumerate(zip(self.optimizer.param_groups, self.group_lrs)):
            if not math.isclose(self.schedule.base_lrs[i], lr, rel_tol=1e-12):
                if self.group_names[i] in flags:
                    self.say(f"resume: {flags[self.group_names[i]]} {lr:g} (the checkpoint had "
                             f"{self.schedule.base_lrs[i]:g}) applies from step {self.step}")
                self.schedule.base_lrs[i] = group["initial_lr"] = lr
                group["lr"] = lr * self.schedule.lr_lambdas[i](self.schedule.last_epoch)
            if "weight_decay" in group and self.group_names[i] != "embedding" and \
                    not math.isclose(group["weight_decay"], self.cfg.weight_decay, rel_tol=1e-12):
                if i == 0:
                    self.say(f"resume: --weight-decay {self.cfg.weight_decay:g} (the checkpoint had "
                             f"{group['weight_decay']:g}) applies from step {self.step}")
                group["weight_decay"] = self.cfg.weight_decay

    # -- Final file -----------------------------------------------------------------------------
    def save_final(self, started: str, target: Path | None = None) -> Path:
        """The adapter file (OUTPUT/NAME.safetensors unless `target`) from the weights in place now."""
        cfg = self.cfg
        adapter = self.adapters.export(NAME)
        adapter.arch = self.arch
        extra = training_metadata(cfg, self.model.name, [(e.path, e.caption) for e in self.data.examples], self.step,
                                  self.step * cfg.grad_accum * self.world // self.batches.per_epoch, started)
        embeddings = self._embeddings()
        if embeddings and not cfg.trigger:
            extra["modelspec.trigger_phrase"] = cfg.train_embedding
        meta = build_metadata(adapter, self.arch, cfg.name, self.prediction, self.resolution, to_dict(cfg), extra)
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.save_precision]
        tensors = [t for m in adapter.modules.values() for t in m.tensors().values()]
        tensors += [t for parts in embeddings.values() for t in parts.values()]
        largest = max((float(t.abs().max()) for t in tensors), default=0.0)
        if largest > torch.finfo(dtype).max:  # the trained run is never lost to the cast
            self.say(f"warning: a weight of {largest:.3g} does not fit --save-precision {cfg.save_precision}; "
                     "saving in fp32 instead")
            dtype = torch.float32
        lpb = self.model.layers_per_block
        path = save_adapter(target or self.final, adapter, fmt=cfg.save_format, metadata=meta,
                            overwrite=True, layers_per_block=lpb, dtype=dtype, embeddings=embeddings)
        # Self-test: the written file parses back to exactly the modules we trained (ANCHORS.md §3.1).
        back, _ = load_adapter(path, lpb)
        bundled = set(read_bundled(path)) if cfg.save_format == "kohya" else set(embeddings)
        if set(back.modules) != set(adapter.modules) or bundled != set(embeddings):
            raise ImgloraError("the saved file does not read back to the trained modules", "report this bug",
                               path=path)
        if embeddings and target is None:  # the token alone, for A1111's and ComfyUI's embeddings folders and diffusers
            write_safetensors(self.out / f"{cfg.name}-emb.safetensors",
                              {k: t.to(dtype) for k, t in standalone_tensors(embeddings[cfg.train_embedding]).items()},
                              {"imglora.token": cfg.train_embedding}, overwrite=True)
        config_json = json.dumps(to_dict(cfg), indent=2, default=str)
        atomic_write(self.out / f"{cfg.name}.json", lambda f: f.write(config_json.encode()), overwrite=True)
        return path

    # -- The loop -------------------------------------------------------------------------------
    def run(self) -> Path:
        try:
            return self._run()
        finally:
            self.lock.release()  # however the run ends, the output folder is free again

    def _run(self) -> Path:
        started = datetime.now(timezone.utc).isoformat()
        if self.cfg.resume:
            self.resume()
        for m in self.models:
            m.train()
        if self.schedule_free:
            self.optimizer.train()  # it steps at y, its train-mode point (a no-op after a resume)
        interrupt = Interrupt()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step", disable=not self.main,
                   dynamic_ncols=True)
        self.last_saved = self.step
        smooth = None  # the loss averaged over about the last 20 steps: one step's loss is mostly noise
        try:
            while self.step < self.total_steps:
                loss, lr, seconds = self._checked_step()
                smooth = loss if smooth is None else 0.95 * smooth + 0.05 * loss
                bar.set_postfix(loss=f"{loss:.4f}", avg=f"{smooth:.4f}", lr=f"{lr:.2e}", refresh=False)
                bar.update(1)
                self._periodic(loss, lr, seconds)
                if interrupt.requested:
                    self._stop_at_interrupt()
            return self._finish(started)
        finally:
            bar.close()
            interrupt.restore()

    def _checked_step(self) -> tuple[float, float, float]:
        """One optimizer step: (loss, learning rate it used, seconds); a non-finite loss stops the run."""
        t0 = time.perf_counter()
        lr = self.schedule.get_last_lr()[0]
        loss = self.train_step()
        if self.schedule_free:  # it warms up inside the optimizer: log the rate it stepped with
            lr = self.optimizer.param_groups[0]["scheduled_lr"]
        if not math.isfinite(loss):
            raise ImgloraError(
                f"the loss became {loss} at step {self.step}; nothing of this step was saved",
                "lower --lr, or use --mixed-precision bf16 instead of fp16; the last good checkpoint "
                f"(if any) is in {self.ckpt_root}", path=self.cfg.output)
        return loss, lr, time.perf_counter() - t0

    def _periodic(self, loss: float, lr: float, seconds: float) -> None:
        """What runs every N steps: the log, checkpoints, validation, samples (the last step's come at the end)."""
        cfg, step, more = self.cfg, self.step, self.step < self.total_steps
        if step % cfg.log_every == 0:
            self.log.log(step, loss=loss, lr=lr, step_seconds=seconds)
        if cfg.save_every and step % cfg.save_every == 0 and more:
            self.save_checkpoint()
        if (cfg.val_every and step % cfg.val_every == 0) or (
                not cfg.val_every and self.last_saved == step and self.data.val):
            self._log_validation()
        if cfg.sample_every and step % cfg.sample_every == 0 and more:
            self.samples()

    def _stop_at_interrupt(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not break the save
        if self.last_saved != self.step:
            self.save_checkpoint()
        self.say(f"stopped at step {self.step} of {self.total_steps}; to continue: {resume_command()}")
        raise KeyboardInterrupt

    def _finish(self, started: str) -> Path:
        """The last validation and samples, then the adapter file (and a final checkpoint if any were kept)."""
        self._log_validation()
        self.samples()
        self._check_in_sync()
        path = self.final
        if self.main:
            with self.shipped():
                path = self.save_final(started)
            if self.ema is not None:  # the trained weights beside their average
                self.save_final(started, self.out / f"{self.cfg.name}-raw.safetensors")
        if self.cfg.save_every:
            self.save_checkpoint()
        self.log.close()
        self.say(f"saved {path}")
        return path

    def _check_in_sync(self) -> None:
        """DDP keeps every process's adapter identical; verify it before writing the one file."""
        self.acc.wait_for_everyone()
        if self.world == 1:
            return
        flat = torch.cat([p.detach().float().flatten() for p in self.unet_params + self.te_params + self.emb_list])
        sums = self.acc.gather(torch.stack([flat.sum(), flat.square().sum()]).to(self.acc.device)[None])
        if not torch.allclose(sums, sums[:1].expand_as(sums), rtol=1e-6, atol=1e-8):
            raise ImgloraError("the training processes ended with different adapters", "report this bug")
        self.say(f"{self.world} processes in sync")

    def _log_validation(self) -> None:
        for m in self.models:
            m.eval()
        value = self.validate()
        for m in self.models:
            m.train()
        if value is not None:
            self.log.log(self.step, val_loss=value)
            self.say(f"step {self.step}: validation loss {value:.5f}")


def train(cfg: TrainConfig) -> Path:
    """Train one adapter as configured and return the path of OUTPUT/NAME.safetensors."""
    return Trainer(cfg).run()


"""The batch side of training: which examples each micro-batch draws, the latent and text caches, and
turning examples into model inputs.

Micro-batch g (counted over all processes) is batch g % per_epoch of epoch g // per_epoch, in the
order `TrainData.epoch_batches` gives for (seed, epoch); its augmentations come from (seed, g). An
image that breaks after the scan is dropped with a warning, and the epochs are recounted without it.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import torch

from ..errors import ImgloraError
from ..formats.files import clean_temp_files
from .data import LatentCache, TrainData, encode_images, pixels, shuffle_caption, vae_fingerprint
from .loss import encode_text, sdxl_time_ids
from .masks import to_latent


class Batches:
    def __init__(self, cfg, data: TrainData, say=print):
        self.cfg, self.data, self.say = cfg, data, say
        self.per_epoch = len(data.epoch_batches(0, cfg.seed, cfg.batch_size))
        self._epoch: dict[int, list[list[int]]] = {}
        self.latents: LatentCache | None = None
        self.text_cache: dict[str, tuple] | None = None

    # -- order ----------------------------------------------------------------------------------
    def indices(self, g: int) -> list[int]:
        """Indices into data.examples of micro-batch g."""
        epoch, position = divmod(g, self.per_epoch)
        if epoch not in self._epoch:
            self._epoch = {epoch: self.data.epoch_batches(epoch, self.cfg.seed, self.cfg.batch_size)}
        return self._epoch[epoch][position]

    def examples(self, g: int) -> list:
        return [self.data.examples[i] for i in self.indices(g)]

    def drawn(self, micro_batches: int) -> list:
        """The examples a run of this many micro-batches draws: all of them, unless it ends within its
        first epoch (a short run on a large folder then encodes only the images it uses)."""
        if micro_batches >= self.per_epoch:
            return self.data.examples
        return [self.data.examples[i] for i in sorted({i for g in range(micro_batches) for i in self.indices(g)})]

    def drop(self, broken: dict) -> None:
        """Leave out images that broke after the scan, with a warning, and recount the epoch."""
        for path, reason in broken.items():
            self.say(f"warning: skipped {path}: {reason} (it changed after the scan)")
        self.data.examples = [e for e in self.data.examples if e.path not in broken]
        self.data.val = [e for e in self.data.val if e.path not in broken]
        if not self.data.examples:
            raise ImgloraError("no usable training images left", "see the skipped files above", path=self.cfg.data)
        self.per_epoch = len(self.data.epoch_batches(0, self.cfg.seed, self.cfg.batch_size))
        self._epoch = {}

    # -- caches ---------------------------------------------------------------------------------
    def prepare(self, pipe, arch: str, device, dtype, channels_last: bool, text_trains: bool, out: Path,
                micro_batches: int, progress: bool) -> None:
        """Bind the models that encode batches and fill the caches the config asks for.
        text_trains: the text encoders have trainable weights, so their forward keeps gradients."""
        cfg = self.cfg
        self.pipe, self.arch, self.device, self.dtype = pipe, arch, device, dtype
        self.channels_last, self.text_trains = channels_last, text_trains
        if cfg.cache_latents != "none":
            disk = Path(cfg.cache_dir or out / ".cache") if cfg.cache_latents == "disk" else None
            if disk is not None:
                disk.mkdir(parents=True, exist_ok=True)
                clean_temp_files(disk)  # entries a killed run was writing
            self.latents = LatentCache(pipe.vae, disk, vae_fingerprint(pipe.vae))
            flips = (False, True) if cfg.flip else (False,)
            while True:  # an image that broke since the scan is dropped, which reshuffles the batches
                self.latents.fill(self.drawn(micro_batches) + self.data.val, flips, progress=progress)
                if not self.latents.broken:
                    break
                self.drop(self.latents.broken)
            if self.latents.reused:
                self.say(f"reused {self.latents.reused} cached latents from {disk}")
        if cfg.cache_text and not cfg.shuffle_captions and not cfg.train_text_encoder:  # captions are fixed
            captions = sorted({e.caption for e in self.data.examples + self.data.val} | {""})
            self.text_cache = {}
            with torch.no_grad():
                for i in range(0, len(captions), 64):
                    chunk = captions[i:i + 64]
                    embeds, pooled = encode_text(pipe, chunk, device)
                    for j, c in enumerate(chunk):
                        self.text_cache[c] = (embeds[j], None if pooled is None else pooled[j])

    # -- one batch ------------------------------------------------------------------------------
    def _caption(self, caption: str, rng: random.Random) -> str:
        cfg = self.cfg
        if cfg.shuffle_captions:
            caption = shuffle_caption(caption, cfg.keep_tokens, rng)
        if cfg.caption_dropout and rng.random() < cfg.caption_dropout:
            caption = ""
        return caption

    def make(self, examples, g: int | None, generator: torch.Generator) -> dict:
        """Latents (sampled from the cached or fresh posterior), text embeddings and conditioning.
        g is the micro-batch (its augmentations); None for validation, which is never augmented."""
        cfg, device = self.cfg, self.device
        rng = random.Random(f"{cfg.seed}/{g}/augment")
        flips = [cfg.flip and g is not None and rng.random() < 0.5 for _ in examples]
        captions = [self._caption(e.caption, rng) if g is not None else e.caption for e in examples]
        if self.latents is not None:
            entries = [self.latents.get(e, f) for e, f in zip(examples, flips)]
            mean = torch.stack([x[0] for x in entries])
            std = torch.stack([x[1] for x in entries])
            originals, crops, masks = [x[2] for x in entries], [x[3] for x in entries], [x[4] for x in entries]
        else:
            good = []
            for e, f, c in zip(examples, flips, captions):
                try:
                    good.append((e, c, pixels(e, cfg.crop, f, rng)))
                except ImgloraError as err:  # broke after the scan: this batch goes on without it
                    self.say(f"warning: skipped {e.path}: {err.what} (it changed after the scan)")
            if not good:
                raise ImgloraError("every image of a batch became unreadable during training",
                                   "check the data folder and resume", path=cfg.data)
            examples, captions, prepared = ([item[i] for item in good] for i in range(3))
            mean, std = encode_images(self.pipe.vae, torch.stack([p[0] for p in prepared]))
            originals, crops = [p[1] for p in prepared], [p[2] for p in prepared]
            masks = [None if p[3] is None else to_latent(p[3], mean.shape[-2:]) for p in prepared]
        latents = mean + std * torch.randn(mean.shape, generator=generator).to(mean.device)
        if self.text_cache is not None:
            embeds = torch.stack([self.text_cache[c][0] for c in captions])
            pooled = torch.stack([self.text_cache[c][1] for c in captions]) if self.arch == "sdxl" else None
        else:
            with contextlib.nullcontext() if self.text_trains else torch.no_grad():
                embeds, pooled = encode_text(self.pipe, captions, device)
        latents = latents.to(device, self.dtype, non_blocking=True)
        if self.channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        batch = {"latents": latents, "embeds": embeds.to(device, self.dtype), "size": len(examples),
                 "weights": torch.tensor([e.weight for e in examples])}
        if cfg.masked_loss:  # an image without a mask trains whole (a white mask)
            masks = [torch.ones((1, *mean.shape[-2:])) if m is None else m for m in masks]
            batch["mask"] = torch.stack(masks).clamp(min=cfg.mask_floor).to(device)
        if self.arch == "sdxl":
            batch["pooled"] = pooled.to(device, self.dtype)
            batch["time_ids"] = sdxl_time_ids(originals, crops, examples[0].bucket, device).to(self.dtype)
        return batch

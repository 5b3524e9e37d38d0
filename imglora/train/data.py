"""Training examples: scanned, bucketed, ordered per epoch, and turned into latents and text embeddings.

Every random choice (order, crop, flip, caption dropout) comes from a generator seeded by
(seed, epoch or step), so an interrupted run that resumes sees exactly the same data.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..data.buckets import bucketer, fit_to_bucket
from ..data.captions import collect_items
from ..data.images import load_image
from ..data.scan import scan_items
from ..errors import ImgloraError, escaped, shown
from ..formats.files import read_safetensors, write_safetensors
from .masks import fit_mask, inside, load_mask, masks_for, to_latent


@dataclass
class Example:
    path: Path
    caption: str
    bucket: tuple[int, int]  # (width, height)
    weight: float = 1.0  # prior_loss_weight for regularisation images
    mask: Path | None = None  # --masked-loss: its mask file, or the image itself for its alpha channel


@dataclass
class TrainData:
    examples: list[Example]  # each repeat of a kohya N_name folder is its own entry
    val: list[Example]
    problems: list  # scan problems (path, reason) of skipped files

    def fingerprint(self) -> str:
        """Identifies the data a checkpoint was trained on: files, sizes, mtimes and captions."""
        h = hashlib.sha256()
        for e in self.examples + self.val:
            try:
                st = e.path.stat()
                stamp = f"{st.st_size}|{st.st_mtime_ns}"
            except OSError:  # gone since the scan: the run goes on without it (Batches.drop)
                stamp = "missing"
            if e.mask is not None:  # a changed mask is other data (unmasked runs keep their fingerprint)
                try:
                    st = e.mask.stat()
                    stamp += f"|mask={e.mask}|{st.st_size}|{st.st_mtime_ns}"
                except OSError:
                    stamp += f"|mask={e.mask}|missing"
            h.update(f"{e.path}|{stamp}|{e.caption}|{e.bucket}|{e.weight}\n".encode())
        return h.hexdigest()[:16]

    def epoch_batches(self, epoch: int, seed: int, batch_size: int) -> list[list[int]]:
        """Batches of example indices, each from one bucket, shuffled by (seed, epoch)."""
        rng = random.Random(f"{seed}/{epoch}")
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, e in enumerate(self.examples):
            by_bucket.setdefault(e.bucket, []).append(i)
        batches = []
        for bucket in sorted(by_bucket):
            idx = by_bucket[bucket]
            rng.shuffle(idx)
            batches += [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
        rng.shuffle(batches)
        return batches


def build_data(cfg, resolution: int, log=print) -> TrainData:
    """Collect, scan and bucket the training (and regularisation) folders; report skipped files."""
    items = []
    for folder, weight, is_reg in ((cfg.data, 1.0, False), (cfg.reg_data, cfg.prior_loss_weight, True)):
        if not folder:
            continue
        if not Path(folder).is_dir():
            raise ImgloraError("no such data folder", "pass a folder of images with captions", path=folder)
        exts = tuple(dict.fromkeys((cfg.caption_extension, ".txt", ".caption")))
        # The trigger word belongs to the concept: regularisation captions never get it.
        found = collect_items(folder, caption_extensions=exts, fallback=cfg.caption_fallback,
                              prefix=None if is_reg else cfg.trigger, log=log)
        if cfg.mask_dir:  # a mask folder inside the data folder holds masks, not training images
            found = [it for it in found if not inside(it.image, cfg.mask_dir)]
        items += [(it, weight, is_reg) for it in found]
    if not items:
        raise ImgloraError("no images found", "put .png/.jpg/.webp images (with .txt captions) in it", path=cfg.data)
    scan = scan_items([it for it, *_ in items], min_side=cfg.min_image_side, workers=cfg.workers)
    ok = {it.image for it in scan.ok}
    problems = [(p.path, p.reason) for p in scan.problems]
    for path, reason in problems:
        log(f"skipped {shown(path)}: {escaped(reason)}")
    bad_fraction = len(problems) / max(1, len({it.image for it, *_ in items}))
    if problems and bad_fraction > cfg.max_bad:
        listing = "; ".join(f"{p}: {r}" for p, r in problems[:20])
        raise ImgloraError(f"{len(problems)} of the images are unusable ({bad_fraction:.0%} > --max-bad "
                           f"{cfg.max_bad:.0%}): {listing}", "fix or remove them, or raise --max-bad", path=cfg.data)
    bucket_of = bucketer(resolution, cfg.bucket_step, cfg.min_bucket, cfg.max_bucket, no_upscale=cfg.no_upscale)
    # Masks belong to the training images; regularisation images train whole.
    masks = masks_for(cfg, list(dict.fromkeys(it.image for it, _, is_reg in items if not is_reg and it.image in ok)),
                      scan.infos, log) if cfg.masked_loss else {}
    examples, seen = [], set()
    for it, weight, is_reg in items:
        if it.image not in ok:
            continue
        example = Example(it.image, it.caption or "", bucket_of(*scan.infos[it.image].size), weight,
                          None if is_reg else masks.get(it.image))
        if not is_reg:  # validation images are held out of the training data only
            seen.add(it.image)
        examples += [example] * max(1, it.repeats)
    val = []
    if cfg.val_count:
        # Hold out whole images (all their repeats), chosen by the seed, from the training set only.
        rng = random.Random(f"{cfg.seed}/val")
        held = set(rng.sample(sorted(seen, key=str), min(cfg.val_count, max(0, len(seen) - 1))))
        val = [next(e for e in examples if e.path == p) for p in sorted(held, key=str)]
        examples = [e for e in examples if e.path not in held]
    return TrainData(examples, val, problems)


def bucket_histogram(data: TrainData) -> str:
    counts: dict[tuple[int, int], int] = {}
    for e in data.examples:
        counts[e.bucket] = counts.get(e.bucket, 0) + 1
    return ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(counts.items()))


# -- pixels and latents ---------------------------------------------------------------------------
def pixels(example: Example, crop: str, flip: bool, rng: random.Random):
    """(3, H, W) in [-1, 1], original size (h, w) and crop top-left (top, left) for SDXL conditioning, and
    the mask as (1, H, W) in [0, 1], scaled, cropped and flipped with the image (None without one)."""
    image = load_image(example.path)
    size = image.size
    image, crop_tl, original = fit_to_bucket(image, example.bucket, crop=crop, rng=rng)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    mask = load_mask(example)
    if mask is not None:
        mask = fit_mask(mask, size, example.bucket, crop_tl, flip)
    return arr, original, crop_tl, mask


@torch.no_grad()
def encode_images(vae, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and std, scaled; a latent is mean + std·noise."""
    dist = vae.encode(batch.to(vae.device, vae.dtype)).latent_dist
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((dist.mean - shift) * scale).float(), (dist.std * scale).float()


class LatentCache:
    """Posterior mean/std (and the mask at latent size) per (example, flip), in memory and optionally on disk,
    keyed by file content (the mask's too), bucket, crop and the VAE, so a later run with the same images
    and VAE reuses them."""

    def __init__(self, vae, disk_dir: Path | None, vae_id: str):
        self.vae, self.disk_dir, self.vae_id = vae, disk_dir, vae_id
        self.memory: dict[tuple[Path, tuple, bool], tuple] = {}
        self.reused = 0
        self.broken: dict[Path, str] = {}  # images that failed to load (after the scan) in the last fill

    def _key(self, example: Example, flip: bool) -> str:
        h = hashlib.sha256(example.path.read_bytes())
        h.update(f"|{example.bucket}|{flip}|{self.vae_id}".encode())
        if example.mask is not None:  # the image's alpha, or a mask file whose every byte counts
            h.update(b"|alpha" if example.mask == example.path else b"|mask|" + example.mask.read_bytes())
        return h.hexdigest()[:32]

    def fill(self, examples: list[Example], flips: tuple[bool, ...], batch: int = 8, progress: bool = True) -> None:
        self.broken = {}
        # Sorted by bucket so that each encoded batch has one image size.
        todo = sorted({(e.path, e.bucket, f) for e in examples for f in flips} - set(self.memory),
                      key=lambda k: (k[1], str(k[0]), k[2]))
        by_path = {(e.path, e.bucket): e for e in examples}
        pending = []
        for path, bucket, flip in tqdm(todo, desc="caching latents", unit="img", disable=not progress):
            example = by_path[(path, bucket)]
            key = None
            if self.disk_dir is not None:
                try:
                    key = self._key(example, flip)
                except OSError as e:  # it passed the scan but is gone or unreadable now
                    self.broken[path] = f"cannot be read ({e.strerror})"
                    continue
                file = self.disk_dir / f"{key}.safetensors"
                if file.is_file():
                    try:
                        t, meta = read_safetensors(file)
                        self.memory[(path, bucket, flip)] = (t["mean"], t["std"], tuple(json.loads(meta["original"])),
                                                             tuple(json.loads(meta["crop"])),
                                                             t["mask"] if example.mask is not None else None)
                        self.reused += 1
                        continue
                    except (ImgloraError, KeyError, ValueError):
                        pass  # a damaged cache entry is recomputed
            if pending and pending[-1][0].bucket != bucket:
                self._encode(pending)
                pending = []
            pending.append((example, flip, key))
            if len(pending) == batch:
                self._encode(pending)
                pending = []
        if pending:
            self._encode(pending)

    def _encode(self, pending):
        prepared, ok = [], []
        for e, f, key in pending:
            try:
                prepared.append(pixels(e, "center", f, random.Random(0)))
                ok.append((e, f, key))
            except ImgloraError as err:  # it passed the scan but broke since (RELIABILITY.md I8)
                self.broken[e.path] = err.what
        pending = ok
        if not pending:
            return
        mean, std = encode_images(self.vae, torch.stack([p[0] for p in prepared]))
        for (e, f, key), (_, original, crop, mask), m, s in zip(pending, prepared, mean, std):
            # Kept in host memory: a large dataset's latents need not fit on the GPU.
            m, s = m.cpu(), s.cpu()
            mask = None if mask is None else to_latent(mask, m.shape[-2:])
            self.memory[(e.path, e.bucket, f)] = (m, s, original, crop, mask)
            if key is not None:
                write_safetensors(self.disk_dir / f"{key}.safetensors",
                                  {"mean": m, "std": s, **({} if mask is None else {"mask": mask})},
                                  {"original": json.dumps(list(original)), "crop": json.dumps(list(crop))},
                                  overwrite=True)

    def get(self, example: Example, flip: bool):
        return self.memory[(example.path, example.bucket, flip)]


def vae_fingerprint(vae) -> str:
    h = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for p in list(vae.parameters())[:4] + list(vae.parameters())[-4:]:
        h.update(p.detach().float().cpu().numpy().tobytes()[:4096])
    return h.hexdigest()[:16]


# -- captions -------------------------------------------------------------------------------------
def shuffle_caption(caption: str, keep: int, rng: random.Random) -> str:
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    head, tail = tags[:keep], tags[keep:]
    rng.shuffle(tail)
    return ", ".join(head + tail)

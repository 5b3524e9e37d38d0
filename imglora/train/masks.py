"""Masked loss (`--masked-loss`): a weight per pixel, from a mask file or the image's own alpha channel.

As kohya sd-scripts (`--masked_loss` with `conditioning_data_dir` or `--alpha_mask`) and OneTrainer (masks,
"unmasked weight"): white trains, black is ignored, grey is in between. The mask is resized, cropped and
flipped with its image (the same scaled size, crop box and flip), then averaged down to latent size: each
latent cell stands for a patch of pixels (8x8 with SD's VAE), and the share of that patch that is white is
the share of its loss that counts (kohya's `interpolate(mode="area")`). Nearest or bilinear sampling would
instead pick one point of the patch, so thin masked parts and edges would flicker in or out with the crop.

The weights are normalised to a mean of 1 per image, so an image trains as much whatever share of it is
white, and a white mask gives exactly the unmasked loss. (kohya does not normalise: its masked loss is
ours times the mask's mean.)

torch is imported where it is used: `imglora-data check` reads masks through here without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..data.buckets import scaled_size
from ..data.captions import walk
from ..data.images import decode_error, has_alpha, load_image, opened, probe_image
from ..data.scan import parallel_map
from ..errors import ImgloraError, shell_word, shown


def mask_index(mask_dir) -> tuple[dict[Path, Path], dict[str, Path]]:
    """The masks in a folder: ({relative path without extension: file}, {stem: file}); the first in sorted
    order wins where two share a name (a.jpg before a.png)."""
    found = walk(mask_dir)
    root = Path(mask_dir)
    by_path: dict[Path, Path] = {}
    by_stem: dict[str, Path] = {}
    for f in found.images:
        rel = f.relative_to(root)
        by_path.setdefault(rel.parent / rel.stem, f)
        by_stem.setdefault(rel.stem, f)
    return by_path, by_stem


def find_mask(image: Path, data_root, index) -> Path | None:
    """The mask of `image` (under `data_root`): MASKS/<its relative path>.<any image type>, else
    MASKS/<its stem>.* (kohya's flat conditioning folder)."""
    by_path, by_stem = index
    rel = image.relative_to(data_root)
    return by_path.get(rel.parent / rel.stem) or by_stem.get(rel.stem)


def inside(path, folder) -> bool:
    """Whether `path` lies in `folder` (a mask folder inside the data folder holds no training images)."""
    real, top = os.path.realpath(path), os.path.realpath(folder).rstrip(os.sep) + os.sep
    return real.startswith(top)


def fits(mask_size, image_size) -> bool:
    """A mask fits its image if it is the image's size or a resize of it: scaling the image by the mask's
    width (or height) gives the mask's other side within a pixel of rounding."""
    (mw, mh), (w, h) = mask_size, image_size
    return abs(h * mw / w - mh) <= 1 or abs(w * mh / h - mw) <= 1


def mask_problem(mask: Path, image_size) -> str | None:
    """Why a mask file cannot be used with an image of `image_size` (its header only), or None."""
    try:
        w, h = probe_image(mask).size
    except ImgloraError as e:
        return f"{shown(mask)}: {e.what}"
    if not fits((w, h), image_size):
        return f"{shown(mask)}: {w}x{h} does not fit its image's {image_size[0]}x{image_size[1]}"
    return None


def masks_for(cfg, images: list[Path], infos, log=print) -> dict[Path, Path]:
    """{training image: its mask} for --masked-loss (the image itself for --alpha-mask). Images without a mask
    train whole, as kohya treats them (a white mask), with a warning that counts them; masks that cannot be
    used (unreadable header, another aspect ratio) stop the run before step 1."""
    if cfg.alpha_mask:
        masks = {p: p for p in images if infos[p].alpha}
        where = "no alpha channel"
    else:
        root = Path(cfg.mask_dir)
        if not root.is_dir():
            raise ImgloraError("no such mask folder", "pass the folder of masks named as the images to --mask-dir",
                               path=root)
        index = mask_index(root)
        masks = {p: m for p in images if (m := find_mask(p, cfg.data, index)) is not None}
        bad = [b for b in parallel_map(lambda pm: mask_problem(pm[1], infos[pm[0]].size), list(masks.items()),
                                       cfg.workers, "checking masks", progress=False) if b]
        if bad:
            raise ImgloraError(f"{len(bad)} mask(s) cannot be used: {'; '.join(bad[:5])}"
                               + ("; ..." if len(bad) > 5 else ""),
                               f"fix or remove them; `imglora-data check {shell_word(cfg.data)} --mask-dir "
                               f"{shell_word(cfg.mask_dir)}` lists every one", path=root)
        where = f"none in {shown(root)}"
    if len(masks) < len(images):
        log(f"warning: {len(images) - len(masks)} of {len(images)} training images have no mask ({where}); "
            "they train on the whole image, as with a white mask")
    return masks


def _as_weights(grey: Image.Image) -> Image.Image:
    return Image.fromarray(np.asarray(grey, dtype=np.float32) / 255.0, "F")


def read_mask(path) -> Image.Image:
    """A mask file as an upright mode-"F" image in [0, 1] (its luminance: white 1, black 0)."""
    try:
        return _as_weights(load_image(path).convert("L"))
    except ImgloraError as e:
        raise ImgloraError(f"mask: {e.what}", e.fix, path=path) from None


def read_alpha(path) -> Image.Image | None:
    """The image's alpha channel as an upright mode-"F" image in [0, 1], or None if it has none."""
    with opened(path) as img:
        try:
            img.load()
            if not has_alpha(img):
                return None
            return _as_weights(ImageOps.exif_transpose(img).convert("RGBA").getchannel("A"))
        except ImgloraError:
            raise
        except Exception as e:  # decoder errors, as in load_image
            raise decode_error(path, e) from None


def load_mask(example) -> Image.Image | None:
    """The example's mask at full size: its mask file, or its alpha channel where `mask` is the image itself."""
    if example.mask is None:
        return None
    return read_alpha(example.path) if example.mask == example.path else read_mask(example.mask)


def fit_mask(mask: Image.Image, image_size, bucket, crop_tl, flip: bool):
    """(1, H, W) of the bucket: the mask scaled to the size its image is scaled to (whatever the mask's own
    resolution), cropped at the image's crop (top, left) and flipped with it."""
    rw, rh = scaled_size(image_size, bucket)
    if mask.size != (rw, rh):
        # Box (area) when shrinking, as the final step to latents; bilinear when enlarging. Both stay in [0, 1].
        shrink = rw * rh < mask.size[0] * mask.size[1]
        mask = mask.resize((rw, rh), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
    (top, left), (bw, bh) = crop_tl, bucket
    mask = mask.crop((left, top, left + bw, top + bh))
    if flip:
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    import torch

    return torch.from_numpy(np.array(mask, dtype=np.float32))[None]


def to_latent(mask, size):
    """(…, 1, H, W) pixel masks averaged down to latent size (h, w) by area."""
    import torch.nn.functional as F

    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    batched = mask if mask.dim() == 4 else mask[None]
    out = F.interpolate(batched.float(), size=tuple(size), mode="area")
    return out if mask.dim() == 4 else out[0]


def loss_weights(mask, size):
    """(B, 1, h, w) per-pixel loss weights with mean 1 per image (0 for an all-black mask): multiplied into
    the element-wise loss before its mean, a white mask leaves the loss exactly as it was."""
    mask = to_latent(mask.float(), size)
    return mask / mask.mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)

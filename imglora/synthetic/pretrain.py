"""Pretrain the embedded base model from scratch on synthetic shapes: `python -m imglora.synthetic.pretrain --out DIR`.

Two stages, both on data rendered by `imglora.synthetic.shapes` from the seed:
1. the VAE (8x: 64x64x3 pixels <-> 8x8x4 latents), on random crops, then briefly on whole images;
2. the UNet and the CLIP text encoder together, as a DDPM (epsilon, 1000 steps) on the cached latents,
   with caption dropout for classifier-free guidance and an EMA of the UNet weights.
The result is a standard diffusers folder (DDIM sampler, trailing spacing) written atomically, plus
imglora.json (generation defaults) and samples.png. Only the base vocabulary is ever rendered:
NEW_SHAPES stay unseen so that a LoRA can teach them later.
"""

from __future__ import annotations

import os

# On a shared 2-core machine, OpenMP threads that spin while waiting for a descheduled partner make a
# step up to 15x slower; a short spin keeps 2 threads within ~15% of their best and never far behind
# one thread. Read by libgomp when torch loads, so it must come first.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..formats.files import atomic_dir, atomic_write
from ..generate import GenerateArgs, generate, image_grid, save_png
from ..models.tiny import load_clip_tokenizer, write_clip_tokenizer
from ..pipeline import load_model
from ..train.optim import make_schedule
from .shapes import BACKGROUNDS, BASE_SHAPES, CAPTION, COLOURS, render, samples

RESOLUTION = 64  # pixels; the VAE downsamples 8x to 8x8x4 latents


@dataclass
class Recipe:
    seed: int = field(default=0, metadata={"help": "seeds the renders, the initial weights and every batch"})
    images: int = field(default=18_000, metadata={"help": "training renders (all base shape x colour x background)"})
    vae_steps: int = field(default=1500, metadata={"help": "VAE steps on random crops"})
    vae_crop: int = field(default=32, metadata={"help": "crop size of the first VAE steps (pixels)"})
    vae_full_steps: int = field(default=200, metadata={"help": "VAE steps on whole 64x64 images, after the crops"})
    vae_batch: int = field(default=32, metadata={"help": "VAE batch size"})
    vae_lr: float = field(default=1e-3, metadata={"help": "VAE AdamW learning rate"})
    kl_weight: float = field(default=1e-4, metadata={"help": "weight of the KL per latent value (L1 is per pixel)"})
    steps: int = field(default=4000, metadata={"help": "UNet + text encoder steps"})
    batch: int = field(default=64, metadata={"help": "UNet batch size"})
    lr: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate (UNet and text encoder)"})
    warmup: int = field(default=200, metadata={"help": "linear warmup steps, then cosine decay to 10%"})
    ema: float = field(default=0.999, metadata={"help": "EMA decay of the UNet weights (0: no EMA)"})
    caption_dropout: float = field(default=0.1, metadata={"help": "share of empty captions (for guidance)"})
    sample_steps: int = field(default=25, metadata={"help": "DDIM steps in samples.png and imglora.json"})
    guidance: float = field(default=4.0, metadata={"help": "guidance scale in samples.png and imglora.json"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})


# The architecture, as data. LoRA targets the attention of every transformer block (attn1/attn2
# to_q/to_k/to_v/to_out.0): two per down block, three per up block and one in the middle.
VAE = dict(block_out_channels=(16, 32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           mid_block_add_attention=False, sample_size=RESOLUTION, force_upcast=False)
UNET = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=RESOLUTION // 8, in_channels=4,
            out_channels=4, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4, norm_num_groups=16)
TEXT = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4)
# Prompts are padded to 20 tokens, not CLIP's 77: captions are ~10 tokens (a trigger word spelled in
# bytes adds ~6), and the text encoder and cross-attention cost scale with the length (2x per step).
MAX_TOKENS = 20
# DDPM training schedule; the linear betas end near zero SNR, so white, gray and black backgrounds
# (very different image means) are all reachable from pure noise.
SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing",
                steps_offset=1)


def vocabulary() -> list[str]:
    """The caption words that get whole-word tokens; any other word tokenizes as bytes."""
    words = CAPTION.replace("{", " ").replace("}", " ").split()
    return sorted(set(w for w in words if w not in ("colour", "shape", "background")) | {"background"}
                  | set(COLOURS) | set(BACKGROUNDS) | set(BASE_SHAPES))


def build_components(tokenizer_dir: Path, seed: int):
    """Freshly initialised vae, unet, text_encoder, tokenizer and the DDIM scheduler."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = load_clip_tokenizer(write_clip_tokenizer(tokenizer_dir, vocabulary(), MAX_TOKENS))
    n = len(tokenizer)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=n, max_position_embeddings=77, bos_token_id=n - 2,
                                                eos_token_id=n - 1, pad_token_id=n - 1, hidden_act="quick_gelu",
                                                **TEXT))
    unet = UNet2DConditionModel(cross_attention_dim=TEXT["hidden_size"], **UNET)
    vae = AutoencoderKL(in_channels=3, out_channels=3, **VAE)
    return vae, unet, text_encoder, tokenizer, DDIMScheduler(**SCHEDULE)


def render_set(n: int, seed: int, shapes=BASE_SHAPES) -> tuple[torch.Tensor, list[str]]:
    """`n` renders as uint8 (n, 3, 64, 64) and their captions; the same seed gives the same set."""
    rng = random.Random(seed + 1)
    labels = samples(n, seed, shapes=shapes)
    pixels = np.stack([np.asarray(render(s.shape, s.colour, s.background, RESOLUTION, rng)) for s in labels])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), [s.caption for s in labels]


def to_unit(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


def random_crops(x: torch.Tensor, crop: int, gen: torch.Generator, tries: int = 3) -> torch.Tensor:
    """One crop per image, the busiest (highest pixel std) of `tries` random ones: mostly edges, not background."""
    b, n = x.shape[0], x.shape[-1] - crop + 1
    offsets = torch.randint(0, n, (tries, b, 2), generator=gen)
    span = torch.arange(crop)
    batch = torch.arange(b)[:, None, None, None]
    channel = torch.arange(x.shape[1])[None, :, None, None]
    crops = [x[batch, channel, (o[:, 0, None] + span)[:, None, :, None], (o[:, 1, None] + span)[:, None, None, :]]
             for o in offsets]  # each (b, 3, crop, crop)
    busiest = torch.stack([c.float().std(dim=(1, 2, 3)) for c in crops]).argmax(dim=0)
    return torch.stack(crops)[busiest, torch.arange(b)]


def train_vae(vae, pixels: torch.Tensor, r: Recipe, gen: torch.Generator, device) -> dict:
    """L1 reconstruction + a small KL; 32x32 crops first (4x cheaper; the VAE is convolutional)."""
    # Start the posterior's log-variance at -6 (std 0.05, where training ends up anyway): with the default
    # std of 1 the decoder first sees mostly noise and learning crawls.
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels:] -= 6.0
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=r.vae_lr, weight_decay=0.0)
    total = r.vae_steps + r.vae_full_steps
    sched = make_schedule(opt, "cosine", 100, total, floor=0.1)
    bar = tqdm(range(total), desc="vae", unit="step", mininterval=2.0)
    for step in bar:
        crop = r.vae_crop if step < r.vae_steps else RESOLUTION
        idx = torch.randint(0, len(pixels), (r.vae_batch,), generator=gen)
        x = to_unit(random_crops(pixels[idx], crop, gen) if crop < RESOLUTION else pixels[idx]).to(device)
        dist = vae.encode(x).latent_dist
        noise = torch.randn(dist.mean.shape, generator=gen).to(device)
        recon = vae.decode(dist.mean + dist.std * noise).sample
        rec = (recon - x).abs().mean()
        kl = dist.kl().mean() / dist.mean[0].numel()  # per latent value
        loss = rec + r.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(l1=f"{rec.item():.4f}", kl=f"{kl.item():.3f}")
    vae.eval()
    return {"vae_l1": rec.item()}


@torch.no_grad()
def encode_all(vae, pixels: torch.Tensor, device, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and stds of every render, unscaled."""
    means, stds = [], []
    for i in range(0, len(pixels), batch):
        dist = vae.encode(to_unit(pixels[i:i + batch]).to(device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    return torch.cat(means), torch.cat(stds)


class EMA:
    """Exponential moving average of a module's weights, with the usual warmup (decay grows with steps)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay, self.steps = decay, 0
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for s, p in zip(self.shadow.parameters(), module.parameters()):
            s.lerp_(p.detach(), 1 - d)


def train_unet(unet, text_encoder, tokenizer, scheduler, latents: tuple[torch.Tensor, torch.Tensor],
               captions: list[str], r: Recipe, gen: torch.Generator, device) -> tuple[torch.nn.Module, dict]:
    """Epsilon-prediction DDPM loss on scaled latents; the text encoder learns with the UNet. Returns the EMA UNet."""
    names = sorted(set(captions)) + [""]  # the last one is the dropped caption
    ids = tokenizer(names, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    where = {c: i for i, c in enumerate(names)}
    caption_idx = torch.tensor([where[c] for c in captions])
    mean, std = latents
    unet.to(device).train()
    text_encoder.to(device).train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=r.lr, weight_decay=0.01)
    sched = make_schedule(opt, "cosine", r.warmup, r.steps, floor=0.1)
    ema = EMA(unet, r.ema) if r.ema else None
    bar = tqdm(range(r.steps), desc="unet+text", unit="step", mininterval=2.0)
    avg = None
    for step in bar:
        idx = torch.randint(0, len(mean), (r.batch,), generator=gen)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)  # a posterior sample
        c = caption_idx[idx].clone()
        c[torch.rand(r.batch, generator=gen) < r.caption_dropout] = len(names) - 1
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (r.batch,), generator=gen)
        # Encode each distinct caption once per step: a batch holds at most 91 of them.
        unique, inverse = torch.unique(c, return_inverse=True)
        embeds = text_encoder(ids[unique.to(device)])[0][inverse.to(device)]  # (batch, 77, hidden)
        noisy = scheduler.add_noise(z, noise, t).to(device)
        pred = unet(noisy, t.to(device), embeds).sample
        loss = F.mse_loss(pred, noise.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if ema:
            ema.update(unet)
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{avg:.4f}")
    unet.eval()
    text_encoder.eval()
    return (ema.shadow if ema else unet), {"unet_loss": avg}


def grid_prompts() -> list[tuple[str, dict]]:
    """Ten rows for samples.png: every base shape twice, cycling colours and backgrounds."""
    colours, backgrounds = list(COLOURS), list(BACKGROUNDS)
    rows = []
    for i in range(2 * len(BASE_SHAPES)):
        labels = dict(colour=colours[i % len(colours)], shape=BASE_SHAPES[i % len(BASE_SHAPES)],
                      background=backgrounds[(i // len(BASE_SHAPES) + i) % len(backgrounds)])
        rows.append((CAPTION.format(**labels), labels))
    return rows


@torch.no_grad()
def sample_grid(model, path: Path, steps: int, guidance: float, cols: int = 6) -> Path:
    """One row per grid_prompts() prompt, seeds 0..cols-1 (the layout of samples.png)."""
    images = []
    for prompt, _ in grid_prompts():
        images += generate(model, GenerateArgs(prompt, seed=0, steps=steps, guidance=guidance, batch=cols))
    return save_png(image_grid(images, cols), path, "imglora pretraining samples: seeds 0..5 per row", overwrite=True)


def save_folder(out: Path, vae, unet, text_encoder, tokenizer, scheduler, defaults: dict) -> None:
    """Write the diffusers folder atomically (an old `out` is replaced only once the new one is complete)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    with atomic_dir(out, replace=True) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        # transformers saves only tokenizer.json; the slow-tokenizer files keep older readers working.
        write_clip_tokenizer(tmp / "tokenizer", vocabulary(), MAX_TOKENS)
        # fp16 UNet and VAE keep the folder under 20 MB; diffusers loads them back as float32. The text
        # encoder stays float32: transformers would otherwise load it as float16.
        for name, module in (("unet", unet), ("vae", vae)):
            copy.deepcopy(module).half().save_pretrained(tmp / name, safe_serialization=True)
        (tmp / "imglora.json").write_text(json.dumps(defaults, indent=2) + "\n")


def pretrain(out: Path, r: Recipe, evaluate_with_judge: bool = True, log=print) -> dict:
    """Both stages, the folder, samples.png and (when the judge is shipped) the base-quality numbers."""
    torch.set_num_threads(r.threads)
    device = torch.device(r.device)
    gen = torch.Generator("cpu").manual_seed(r.seed)
    t0, c0 = time.perf_counter(), time.process_time()
    scratch = out.parent / f".{out.name}.tokenizer-{os.getpid()}"
    vae, unet, text_encoder, tokenizer, scheduler = build_components(scratch, r.seed)
    shutil.rmtree(scratch, ignore_errors=True)
    pixels, captions = render_set(r.images, r.seed)
    info: dict = {"render_s": round(time.perf_counter() - t0, 1)}
    info.update(train_vae(vae, pixels, r, gen, device))
    info["vae_s"] = round(time.perf_counter() - t0, 1)
    mean, std = encode_all(vae, pixels, device)
    # scaling_factor gives the diffusion model unit-variance latents, as SD's 0.18215 does.
    scale = 1.0 / float(torch.sqrt(mean.var() + std.pow(2).mean()))  # the std of posterior samples
    vae.register_to_config(scaling_factor=round(scale, 5))
    info["scaling_factor"] = round(scale, 5)
    info["latent_mean"] = round(float(mean.mean()) * scale, 4)
    unet, stats = train_unet(unet, text_encoder, tokenizer, scheduler, (mean * scale, std * scale), captions, r,
                             gen, device)
    info.update(stats)
    info["train_s"] = round(time.perf_counter() - t0, 1)
    info["cpu_s"] = round(time.process_time() - c0, 1)
    defaults = {"resolution": RESOLUTION, "steps": r.sample_steps, "guidance": r.guidance,
                "pretrain": {"recipe": asdict(r), "results": info}}
    for m in (vae, unet, text_encoder):
        m.to("cpu")
    save_folder(out, vae, unet, text_encoder, tokenizer, scheduler, defaults)
    model = load_model(out)
    sample_grid(model, out.parent / f"{out.name}-samples.png", r.sample_steps, r.guidance)
    if evaluate_with_judge:
        from .judge import JUDGE_PATH, base_prompts, evaluate, load_judge

        if JUDGE_PATH.is_file():
            info["quality"] = evaluate(model, base_prompts(), judge=load_judge(), steps=r.sample_steps,
                                       guidance=r.guidance)
            log(f"base quality: {json.dumps(info['quality'])}")
    defaults["pretrain"]["results"] = info
    text = json.dumps(defaults, indent=2) + "\n"
    atomic_write(out / "imglora.json", lambda f: f.write(text.encode()), overwrite=True)
    info["total_s"] = round(time.perf_counter() - t0, 1)
    log(f"wrote {out} in {info['total_s']:.0f} s: {json.dumps(info)}")
    return info


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m imglora.synthetic.pretrain", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="the diffusers folder to write")
    p.add_argument("--no-eval", action="store_true", help="skip the judge's base-quality evaluation")
    for f in fields(Recipe):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f.metadata["help"] + f" (default {f.default})")
    args = p.parse_args(argv)
    recipe = Recipe(**{f.name: getattr(args, f.name) for f in fields(Recipe)})
    pretrain(args.out, recipe, evaluate_with_judge=not args.no_eval)


if __name__ == "__main__":
    main()

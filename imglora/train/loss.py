"""The diffusion training loss: noise, timesteps, epsilon or v target, min-SNR-γ and per-sample weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def encode_text(pipe, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt embeddings (and SDXL's pooled embedding) exactly as the pipeline computes them."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        embeds, _, pooled, _ = pipe.encode_prompt(captions, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return embeds, pooled
    embeds, _ = pipe.encode_prompt(captions, device, 1, False)
    return embeds, None


def sdxl_time_ids(originals, crops, target: tuple[int, int], device) -> torch.Tensor:
    """SDXL micro-conditioning from the real crop: (orig_h, orig_w, top, left, target_h, target_w)."""
    rows = [list(o) + list(c) + [target[1], target[0]] for o, c in zip(originals, crops)]
    return torch.tensor(rows, dtype=torch.float32, device=device)


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    return alphas / (1 - alphas)


def diffusion_loss(unet, scheduler, latents, embeds, generator: torch.Generator, *, prediction: str,
                   sample_weights: torch.Tensor, pooled=None, time_ids=None, noise_offset: float = 0.0,
                   min_snr_gamma: float | None = None, timesteps: torch.Tensor | None = None,
                   noise: torch.Tensor | None = None) -> torch.Tensor:
    """Mean weighted MSE between the UNet's prediction and the target for one batch.

    Noise and timesteps come from `generator` (CPU), so the same step seed gives the same loss on
    any device; validation passes fixed `timesteps` and `noise`.
    """
    b = latents.shape[0]
    device = latents.device
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator)
        if noise_offset:
            noise = noise + noise_offset * torch.randn((b, latents.shape[1], 1, 1), generator=generator)
    noise = noise.to(device, latents.dtype)
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator)
    timesteps = timesteps.to(device).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise if prediction == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    extra = {}
    if pooled is not None:
        extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    pred = unet(noisy, timesteps, embeds, **extra).sample
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    weights = sample_weights.to(device)
    if min_snr_gamma:
        s = snr(scheduler, timesteps)
        clipped = torch.clamp(s, max=min_snr_gamma)
        weights = weights * (clipped / (s + 1) if prediction == "v_prediction" else clipped / s)
    return (loss * weights).mean()

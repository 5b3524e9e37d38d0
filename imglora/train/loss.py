"""The diffusion training loss: noise, timesteps, epsilon or v target, the loss function and its weights.

Everything random comes from one CPU generator per step, in a fixed order (noise, offset noise, pyramid
noise, timesteps), so the same step seed gives the same loss on any device and a resumed run is exact.
The options follow kohya sd-scripts' definitions (library/train_util.py, custom_train_functions.py), so a
recipe tuned there means the same here.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ImgloraError
from .masks import loss_weights

LOSSES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
TIMESTEP_SAMPLING = ("uniform", "logit_normal")
TIMESTEP_BIAS = ("none", "earlier", "later")
SNR_CAP = 1000.0  # kohya's cap on the SNR in the debiased weight (the SNR of t=0 is about 1000 on SD)


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
    """ᾱ/(1-ᾱ): 0 at the last step of a zero-terminal-SNR schedule, never infinite (ᾱ < 1 at t = 0)."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    return alphas / (1 - alphas)


# -- Schedules ----------------------------------------------------------------------------------------
def training_scheduler(config, zero_terminal_snr: bool = False):
    """The noise schedule training adds noise with: a DDPMScheduler of the model's betas, whatever sampler
    the model ships (as kohya and diffusers' training scripts do). A sampler's own add_noise need not be the
    DDPM forward process (Euler's is x + σ·ε, the unscaled k-diffusion form). zero_terminal_snr: the betas
    rescaled so the last step is pure noise (Lin et al. 2023; diffusers' rescale_zero_terminal_snr, the
    same formula as kohya's fix_noise_scheduler_betas_for_zero_terminal_snr): ᾱ_T = 0 exactly."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(config, rescale_betas_zero_snr=zero_terminal_snr)


def zero_snr_sampler(scheduler):
    """The model's sampler with the setting that matches a zero-terminal-SNR training schedule:
    rescale_betas_zero_snr and "trailing" timesteps, so sampling starts at the last step, pure noise (the
    paper's §3.3). Samplers that lack the setting (PNDM, LMS) are replaced by DDIM, which has it."""
    from diffusers import DDIMScheduler

    cls = type(scheduler)
    if "rescale_betas_zero_snr" not in inspect.signature(cls.__init__).parameters:
        cls = DDIMScheduler
    return cls.from_config(scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")


# -- Timesteps ----------------------------------------------------------------------------------------
class TimestepSampler:
    """Draws training timesteps in [low, high): uniformly (kohya's randint(min_timestep, max_timestep)), or
    logit-normally (SD3's: t = ⌊sigmoid(n)·(high-low)⌋ + low with n ~ N(mean, std), which favours the middle),
    optionally with a bias: the earliest or latest `portion` of the range weighted `multiplier` times (diffusers'
    timestep_bias_strategy, over [low, high) instead of the whole schedule).

    Anything but the plain uniform case draws from the exact per-timestep probabilities (`weights`) with
    torch.multinomial: each integer timestep gets the logit-normal mass of its bin, times its bias."""

    def __init__(self, num_train_timesteps: int, low: int = 0, high: int | None = None, sampling: str = "uniform",
                 mean: float = 0.0, std: float = 1.0, bias: str = "none", multiplier: float = 1.0,
                 portion: float = 0.25):
        high = num_train_timesteps if high is None else high
        if not 0 <= low < high <= num_train_timesteps:
            raise ImgloraError(f"timesteps [{low}, {high}) are not inside the model's [0, {num_train_timesteps})",
                               f"give --max-timestep at most {num_train_timesteps} and above --min-timestep")
        self.low, self.high = low, high
        self.weights = None
        if sampling == "uniform" and bias == "none":
            return
        n = high - low
        if sampling == "logit_normal":
            # The mass of N(mean, std) between the logits of the bin edges k/n and (k+1)/n.
            edges = torch.arange(n + 1, dtype=torch.float64) / n
            cdf = torch.special.ndtr((torch.logit(edges) - mean) / std)  # logit(0) = -inf, logit(1) = inf
            w = cdf[1:] - cdf[:-1]
        else:
            w = torch.ones(n, dtype=torch.float64)
        if bias != "none":
            k = max(1, round(portion * n))
            part = slice(0, k) if bias == "earlier" else slice(n - k, n)
            w[part] *= multiplier
        self.weights = w / w.sum()

    def __call__(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        if self.weights is None:
            return torch.randint(self.low, self.high, (batch,), generator=generator)
        return self.low + torch.multinomial(self.weights, batch, replacement=True, generator=generator)


# -- Noise --------------------------------------------------------------------------------------------
def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """kohya's pyramid_noise_like (multi-resolution noise): noise plus, for i = 0, 1, ..., upsampled noise at
    1/r^i of the size (r drawn in [2, 4) each time) weighted discount^i, until a side reaches 1; then divided by
    its std over the whole batch. Its draws come from `generator` (kohya's from the global RNGs)."""
    b, c, h, w = noise.shape
    up = torch.nn.Upsample(size=(h, w), mode="bilinear")
    noise = noise.clone()
    for i in range(iterations):
        r = float(torch.rand((), generator=generator)) * 2 + 2
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        noise += up(torch.randn((b, c, hn, wn), generator=generator)) * discount**i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


# -- Loss functions and weights -----------------------------------------------------------------------
def huber_threshold(schedule: str, c: float, scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """kohya's get_huber_threshold_if_needed (huber_scale 1): the Huber c of each sample. constant: c;
    exponential: exp(-α·t) with α = -ln(c)/T, from 1 at t = 0 down to c at t = T; snr: (1-c)/(1+σ)² + c with
    σ = sqrt((1-ᾱ)/ᾱ), near 1 for clean steps and c for noisy ones (c exactly where σ is infinite)."""
    t = timesteps.cpu()
    if schedule == "constant":
        return torch.full(t.shape, c)
    if schedule == "exponential":
        alpha = -math.log(c) / scheduler.config.num_train_timesteps
        return torch.exp(-alpha * t)
    alphas = scheduler.alphas_cumprod.cpu()[t]
    sigmas = ((1.0 - alphas) / alphas) ** 0.5
    return (1 - c) / (1 + sigmas) ** 2 + c


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "l2",
                     c: torch.Tensor | None = None) -> torch.Tensor:
    """kohya's conditional_loss without the reduction. huber: 2c(sqrt((p-t)² + c²) - c), which is (p-t)² for
    small errors and grows like 2c|p-t| for large ones; smooth_l1: the same divided by c. c: one per sample."""
    if kind == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if kind == "l1":
        return F.l1_loss(pred, target, reduction="none")
    c = c.to(pred.device, pred.dtype).view(-1, *[1] * (pred.dim() - 1))
    root = torch.sqrt((pred - target) ** 2 + c**2) - c
    return 2 * c * root if kind == "huber" else 2 * root


def snr_weights(s: torch.Tensor, prediction: str, min_snr_gamma: float | None = None,
                debiased: bool = False) -> torch.Tensor:
    """The per-sample loss weight from the SNR s.

    min-SNR-γ (Hang et al. 2023, kohya's apply_snr_weight): min(s, γ)/s for epsilon, min(s, γ)/(s+1) for v;
    the epsilon form is written min(γ/s, 1), its value wherever s > 0 and its limit 1 at s = 0 (the last step
    of a zero-terminal-SNR schedule), where min(s, γ)/s would be 0/0.
    debiased estimation (kohya's apply_debiased_estimation): 1/sqrt(s) for epsilon, 1/(s+1) for v, with s capped
    at 1000. Epsilon's is infinite at s = 0; zero terminal SNR needs v-prediction, so that cannot happen."""
    w = torch.ones_like(s)
    if min_snr_gamma:
        w = w * (torch.clamp(min_snr_gamma / s, max=1.0) if prediction == "epsilon"
                 else torch.clamp(s, max=min_snr_gamma) / (s + 1))
    if debiased:
        capped = torch.clamp(s, max=SNR_CAP)
        w = w * (1 / (capped + 1) if prediction == "v_prediction" else 1 / torch.sqrt(capped))
    return w


@dataclass
class LossOptions:
    """What a run's loss is made of (the TrainConfig fields of the same meaning)."""

    prediction: str = "epsilon"
    noise_offset: float = 0.0
    multires_iterations: int = 0
    multires_discount: float = 0.3
    min_snr_gamma: float | None = None
    debiased: bool = False
    loss: str = "l2"
    huber_c: float = 0.1
    huber_schedule: str = "snr"
    timesteps: TimestepSampler | None = None  # None: uniform over the whole schedule

    @classmethod
    def from_config(cls, cfg, prediction: str, num_train_timesteps: int) -> "LossOptions":
        sampler = TimestepSampler(num_train_timesteps, cfg.min_timestep, cfg.max_timestep, cfg.timestep_sampling,
                                  cfg.logit_mean, cfg.logit_std, cfg.timestep_bias, cfg.timestep_bias_multiplier,
                                  cfg.timestep_bias_portion)
        return cls(prediction, cfg.noise_offset, cfg.multires_noise_iterations, cfg.multires_noise_discount,
                   cfg.min_snr_gamma, cfg.debiased_estimation, cfg.loss, cfg.huber_c, cfg.huber_schedule, sampler)


def diffusion_loss(unet, scheduler, latents, embeds, generator: torch.Generator, *, options: LossOptions,
                   sample_weights: torch.Tensor, pooled=None, time_ids=None, timesteps: torch.Tensor | None = None,
                   noise: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean weighted loss between the UNet's prediction and the target for one batch.
    `mask`: (B, 1, h, w) per-pixel weights in [0, 1] (--masked-loss; train/masks.py), at latent or pixel size.

    Noise and timesteps come from `generator` (CPU), so the same step seed gives the same loss on
    any device; validation passes fixed `timesteps` and `noise`.
    """
    o = options
    b = latents.shape[0]
    device = latents.device
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator)
        if o.noise_offset:
            noise = noise + o.noise_offset * torch.randn((b, latents.shape[1], 1, 1), generator=generator)
        if o.multires_iterations:  # after the offset, as kohya
            noise = pyramid_noise(noise, generator, o.multires_iterations, o.multires_discount)
    noise = noise.to(device, latents.dtype)
    if timesteps is None:
        sampler = o.timesteps or TimestepSampler(scheduler.config.num_train_timesteps)
        timesteps = sampler(b, generator)
    timesteps = timesteps.to(device).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise if o.prediction == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    extra = {}
    if pooled is not None:
        extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    pred = unet(noisy, timesteps, embeds, **extra).sample
    c = huber_threshold(o.huber_schedule, o.huber_c, scheduler, timesteps) if o.loss in ("huber", "smooth_l1") else None
    loss = elementwise_loss(pred.float(), target.float(), o.loss, c)
    if mask is not None:  # weights of mean 1 per image: a white mask leaves the loss exactly as it was
        loss = loss * loss_weights(mask.to(device), loss.shape[-2:])
    loss = loss.mean(dim=(1, 2, 3))
    weights = sample_weights.to(device)
    if o.min_snr_gamma or o.debiased:
        weights = weights * snr_weights(snr(scheduler, timesteps), o.prediction, o.min_snr_gamma, o.debiased)
    return (loss * weights).mean()

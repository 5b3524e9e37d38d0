"""Training methods: timestep sampling, zero terminal SNR, debiased estimation, Huber losses, pyramid noise,
LoRA+, Adafactor, schedule-free AdamW and EMA: each does what its formula says, and runs resume exactly."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import TRAIN_FLAGS, train_flags

from imglora.cli import main
from imglora.config import TrainConfig
from imglora.errors import ImgloraError
from imglora.formats.lora_file import load_adapter
from imglora.lora.adapters import Adapters
from imglora.synthetic.shapes import synth_shapes
from imglora.train.ema import EMA, shipped_weights
from imglora.train.loop import NAME, Trainer
from imglora.train.loss import (LossOptions, TimestepSampler, diffusion_loss, elementwise_loss, encode_text,
                                huber_threshold, pyramid_noise, snr, snr_weights, training_scheduler,
                                zero_snr_sampler)
from imglora.train.optim import make_optimizer, make_schedule, param_groups, up_factors


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    synth_shapes(d, 12, seed=1, size=32)
    return d


@pytest.fixture(scope="module")
def vpred_dir(tmp_path_factory):
    from imglora.models.tiny import tiny_sd_pipeline

    d = tmp_path_factory.mktemp("vpred")
    tiny_sd_pipeline(d / "tok", v_prediction=True, linear_proj=True).save_pretrained(d / "sd2")
    return d / "sd2"


def trainer(model, data, out, **kw) -> Trainer:
    cfg = TrainConfig(model=str(model), data=str(data), output=str(out), **{**TRAIN_FLAGS, **kw})
    cfg.check()
    return Trainer(cfg)


def run_train(*args):
    return main(["train", *map(str, args)])


def losses(out) -> list[float]:
    rows = [json.loads(line) for line in (out / "logs" / "train.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def ddpm(**kw):
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", **kw)


# -- Timesteps ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [dict(), dict(sampling="logit_normal", mean=0.5, std=0.8),
                                  dict(bias="later", multiplier=3.0), dict(sampling="logit_normal", bias="earlier",
                                                                           multiplier=0.5)])
def test_timesteps_stay_in_range_and_repeat_with_the_seed(kind):
    sampler = TimestepSampler(1000, 100, 300, **kind)
    draw = lambda seed: sampler(4000, torch.Generator().manual_seed(seed))  # noqa: E731
    t = draw(1)
    assert t.dtype == torch.int64 and int(t.min()) >= 100 and int(t.max()) <= 299
    assert len(t.unique()) > 150  # the whole range is reached, not a few values
    assert torch.equal(t, draw(1)) and not torch.equal(t, draw(2))


def test_logit_normal_concentrates_in_the_middle():
    sampler = TimestepSampler(1000, sampling="logit_normal")
    # Each timestep has the mass of N(0, 1) between the logits of its bin's edges: the middle third gets
    # P(|n| < logit(2/3)) = erf(ln 2 / √2), 0.512, against 1/3 uniformly.
    middle = float(sampler.weights[333:667].sum())
    exact = math.erf(math.log(0.667 / 0.333) / math.sqrt(2))
    assert middle == pytest.approx(exact, abs=1e-3) and middle == pytest.approx(0.512, abs=0.002)
    t = sampler(20000, torch.Generator().manual_seed(0)).float()
    assert ((t >= 333) & (t < 667)).float().mean() == pytest.approx(middle, abs=0.015)
    assert float(t.mean()) == pytest.approx(499.5, abs=6)
    # SD3's own recipe, floor(sigmoid(n)·T), gives the same distribution.
    sd3 = (torch.sigmoid(torch.randn(200000, generator=torch.Generator().manual_seed(1))) * 1000).long()
    hist = torch.bincount(sd3, minlength=1000).double() / len(sd3)
    assert (hist.cumsum(0) - sampler.weights.cumsum(0)).abs().max() < 0.005
    # A positive mean favours the noisier end.
    shifted = TimestepSampler(1000, sampling="logit_normal", mean=1.0)(20000, torch.Generator().manual_seed(0))
    assert float(shifted.float().mean()) > 650


def test_timestep_bias_weights_its_portion():
    later = TimestepSampler(1000, 200, 1000, bias="later", multiplier=3.0, portion=0.25)
    # The last quarter of [200, 1000), 200 timesteps, three times as likely: 3·200 / (3·200 + 600) = 1/2.
    assert float(later.weights[-200:].sum()) == pytest.approx(0.5, abs=1e-12)
    assert float(later.weights[-1] / later.weights[0]) == pytest.approx(3.0, rel=1e-12)
    t = later(20000, torch.Generator().manual_seed(0))
    assert (t >= 800).float().mean() == pytest.approx(0.5, abs=0.015)
    earlier = TimestepSampler(1000, bias="earlier", multiplier=4.0, portion=0.1)
    assert float(earlier.weights[:100].sum()) == pytest.approx(400 / (400 + 900), abs=1e-12)


# -- Zero terminal SNR -----------------------------------------------------------------------------
def test_zero_terminal_snr_schedule_and_the_weights_at_its_last_step():
    plain, zero = training_scheduler(ddpm().config), training_scheduler(ddpm().config, zero_terminal_snr=True)
    assert float(plain.alphas_cumprod[-1]) > 1e-3
    assert float(zero.alphas_cumprod[-1]) == 0.0
    assert float(zero.alphas_cumprod[0]) == pytest.approx(float(plain.alphas_cumprod[0]), rel=1e-6)
    assert bool((zero.alphas_cumprod[1:] < zero.alphas_cumprod[:-1]).all())  # still decreasing
    last = torch.tensor([999])
    s = snr(zero, last)
    assert float(s) == 0.0
    # The weights stay finite where the SNR is 0: min-SNR's limits (1 for epsilon, 0 for v), debiased v's 1.
    assert float(snr_weights(s, "epsilon", min_snr_gamma=5)) == 1.0
    assert float(snr_weights(s, "v_prediction", min_snr_gamma=5)) == 0.0
    assert float(snr_weights(s, "v_prediction", debiased=True)) == 1.0
    assert float(huber_threshold("snr", 0.1, zero, last)) == pytest.approx(0.1, abs=1e-7)
    # The noisy latent at the last step is pure noise, and v-prediction's target is -x0.
    x0, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    assert torch.allclose(zero.add_noise(x0, eps, last), eps)
    assert torch.allclose(zero.get_velocity(x0, eps, last), -x0)


def test_training_noise_is_the_ddpm_forward_process_whatever_the_sampler():
    from diffusers import EulerDiscreteScheduler

    euler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sched = training_scheduler(euler.config)  # SDXL ships Euler, whose add_noise is x + σ·ε (k-diffusion's)
    x0, eps, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    ab = euler.alphas_cumprod[t].view(2, 1, 1, 1)
    assert torch.allclose(sched.add_noise(x0, eps, t), ab.sqrt() * x0 + (1 - ab).sqrt() * eps, atol=1e-6)
    assert not torch.allclose(euler.add_noise(x0, eps, t), sched.add_noise(x0, eps, t), atol=1e-2)


def test_zero_snr_samplers_get_the_matching_setting():
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    for cls, want in [(DDIMScheduler, DDIMScheduler), (EulerDiscreteScheduler, EulerDiscreteScheduler),
                      (PNDMScheduler, DDIMScheduler)]:  # PNDM has no such setting: DDIM takes over
        s = zero_snr_sampler(cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"))
        assert type(s) is want
        assert s.config.rescale_betas_zero_snr is True and s.config.timestep_spacing == "trailing"
        s.set_timesteps(4)
        assert int(s.timesteps[0]) == 999  # sampling starts from the pure-noise step


def test_zero_terminal_snr_trains_and_samples_a_v_model_and_refuses_epsilon(vpred_dir, model_dir, shapes,
                                                                             tmp_path):
    from PIL import Image

    tr = trainer(vpred_dir, shapes, tmp_path / "z", steps=3, zero_terminal_snr=True, sample_prompts=["a red circle"],
                 sample_steps=2)
    assert float(tr.noise_scheduler.alphas_cumprod[-1]) == 0.0
    assert tr.pipe.scheduler.config.rescale_betas_zero_snr and tr.pipe.scheduler.config.timestep_spacing == "trailing"
    path = tr.run()
    assert all(math.isfinite(v) for v in losses(tmp_path / "z"))
    image = torch.tensor(list(Image.open(tmp_path / "z" / "samples" / "step-0000003" / "01-lora-w1.png").getdata()))
    assert float(image.float().std()) > 1  # a rendered image, not a NaN-black one
    with safe_open(path, "pt") as f:
        assert f.metadata()["ss_zero_terminal_snr"] == "True"
    with pytest.raises(ImgloraError, match="needs a v-prediction model"):
        trainer(model_dir, shapes, tmp_path / "eps", steps=1, zero_terminal_snr=True)


# -- Loss weights and loss functions ---------------------------------------------------------------
def test_debiased_estimation_weights_are_kohyas():
    s = torch.tensor([0.01, 0.5, 1.0, 4.0, 999.0, 2000.0])
    capped = torch.tensor([0.01, 0.5, 1.0, 4.0, 999.0, 1000.0])  # kohya caps the SNR at 1000
    eps = snr_weights(s, "epsilon", debiased=True)
    v = snr_weights(s, "v_prediction", debiased=True)
    assert torch.allclose(eps, 1 / capped.sqrt(), rtol=1e-6) and float(eps[0]) == pytest.approx(10.0, rel=1e-5)
    assert torch.allclose(v, 1 / (capped + 1), rtol=1e-6) and float(v[2]) == 0.5
    # With min-SNR as well (kohya applies both): the product.
    both = snr_weights(s, "epsilon", min_snr_gamma=5.0, debiased=True)
    assert torch.allclose(both, torch.minimum(s, torch.tensor(5.0)) / s / capped.sqrt(), rtol=1e-6)
    assert torch.equal(snr_weights(s, "epsilon"), torch.ones(6))


def test_huber_and_smooth_l1_match_the_closed_form():
    pred = torch.tensor([[0.0, 0.05, 1.0, -3.0]]).repeat(2, 1).view(2, 1, 2, 2)
    target = torch.zeros_like(pred)
    c = torch.tensor([0.1, 0.5])
    d = pred.view(2, 4)
    cc = c.view(2, 1)
    huber = 2 * cc * (torch.sqrt(d**2 + cc**2) - cc)
    assert torch.allclose(elementwise_loss(pred, target, "huber", c).view(2, 4), huber)
    assert torch.allclose(elementwise_loss(pred, target, "smooth_l1", c).view(2, 4), huber / cc)
    # A concrete value: error 1, c = 0.5: 2·0.5·(√1.25 − 0.5) = 0.6180.
    assert float(elementwise_loss(pred, target, "huber", c)[1, 0, 1, 0]) == pytest.approx(0.618034, abs=1e-6)
    # Small errors cost about the squared error; large ones grow like 2c|e| (robust to outliers).
    assert float(elementwise_loss(pred, target, "huber", c)[0, 0, 0, 1]) == pytest.approx(0.05**2, rel=0.15)
    big = torch.tensor([100.0]).view(1, 1, 1, 1)
    assert float(elementwise_loss(big, torch.zeros_like(big), "huber", torch.tensor([0.1]))) == pytest.approx(
        2 * 0.1 * 100, rel=0.01)
    assert torch.equal(elementwise_loss(pred, target, "l2"), pred**2)
    assert torch.equal(elementwise_loss(pred, target, "l1"), pred.abs())


def test_huber_schedules_are_kohyas():
    sched = ddpm()
    t = torch.tensor([0, 250, 500, 1000 - 1])
    assert torch.equal(huber_threshold("constant", 0.1, sched, t), torch.full((4,), 0.1))
    # exponential: exp(-α t), α = -ln(c)/T: 1 at t = 0 and c at t = T (so √c half-way).
    expo = huber_threshold("exponential", 0.1, sched, torch.tensor([0, 500, 1000]))
    assert torch.allclose(expo, torch.tensor([1.0, math.sqrt(0.1), 0.1]), rtol=1e-6)
    ab = sched.alphas_cumprod[t].double()
    want = (1 - 0.1) / (1 + ((1 - ab) / ab).sqrt()) ** 2 + 0.1
    got = huber_threshold("snr", 0.1, sched, t)
    assert torch.allclose(got.double(), want, rtol=1e-6)
    assert float(got[0]) > 0.9 and float(got[-1]) < 0.11  # near 1 for clean steps, near c for noisy ones


def test_the_default_loss_is_plain_mse_and_huber_applies_to_the_unet_output(make_pipe):
    pipe = make_pipe("sd1")
    sched = training_scheduler(pipe.scheduler.config)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    embeds, _ = encode_text(pipe, ["a red circle", "a blue square"], "cpu")
    ones = torch.ones(2)
    with torch.no_grad():
        got = diffusion_loss(pipe.unet, sched, latents, embeds, torch.Generator().manual_seed(5),
                             options=LossOptions(), sample_weights=ones)
        g = torch.Generator().manual_seed(5)
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (2,), generator=g)
        pred = pipe.unet(sched.add_noise(latents, noise, t), t, embeds).sample
        assert torch.equal(got, ((pred - noise) ** 2).mean(dim=(1, 2, 3)).mean())  # the same draws, bit for bit
        opts = LossOptions(loss="huber", huber_c=0.2, huber_schedule="constant")
        huber = diffusion_loss(pipe.unet, sched, latents, embeds, torch.Generator().manual_seed(5), options=opts,
                               sample_weights=ones)
        closed = (2 * 0.2 * (torch.sqrt((pred - noise) ** 2 + 0.04) - 0.2)).mean()
        assert float(huber) == pytest.approx(float(closed), rel=1e-6) and float(huber) < float(got)


# -- Pyramid noise -----------------------------------------------------------------------------------
def test_pyramid_noise_is_kohyas_and_comes_from_the_generator():
    shape = (2, 4, 32, 24)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(shape, generator=g)
    out = pyramid_noise(base, g, iterations=6, discount=0.3)
    assert out.shape == shape and not torch.equal(out, base)
    assert float(out.std()) == pytest.approx(1.0, abs=1e-6)  # renormalised by its std, as kohya
    g2 = torch.Generator().manual_seed(3)
    again = pyramid_noise(torch.randn(shape, generator=g2), g2, iterations=6, discount=0.3)
    assert torch.equal(out, again)
    g3 = torch.Generator().manual_seed(4)
    assert not torch.equal(out, pyramid_noise(torch.randn(shape, generator=g3), g3, 6, 0.3))
    # One iteration is kohya's i = 0 term alone: full-size noise added at weight 1, then renormalised.
    g4 = torch.Generator().manual_seed(3)
    n = torch.randn(shape, generator=g4)
    one = pyramid_noise(n, g4, iterations=1, discount=0.3)
    g5 = torch.Generator().manual_seed(3)
    n5 = torch.randn(shape, generator=g5)
    torch.rand((), generator=g5)  # the scale r, drawn every iteration
    both = n5 + torch.randn(shape, generator=g5)
    assert torch.allclose(one, both / both.std(), atol=1e-6)
    # Coarse scales make neighbouring values correlated (white noise has none), the more the less discounted.
    def neighbour_corr(x):
        a, b = x[..., :, 1:].flatten(), x[..., :, :-1].flatten()
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    g6 = torch.Generator().manual_seed(3)
    strong = pyramid_noise(torch.randn(shape, generator=g6), g6, iterations=6, discount=0.8)
    assert abs(neighbour_corr(base)) < 0.05 and neighbour_corr(strong) > 0.15


# -- LoRA+ -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_loraplus_gives_up_factors_r_times_the_rate_through_the_schedule(make_pipe, kind):
    pipe = make_pipe("sd1")
    adapters = Adapters(pipe)
    adapters.create("t", adapters.targets("cross-attn", text_encoder=True), rank=2, kind=kind)
    named = adapters.named_parameters("t")
    unet = [p for k, p in named.items() if k.startswith("unet.")]
    te = [p for k, p in named.items() if not k.startswith("unet.")]
    groups = param_groups(unet, te, 1e-3, 4e-4, loraplus_ratio=16, up=up_factors(named))
    by_name = {g["name"]: g for g in groups}
    assert list(by_name) == ["unet", "unet_plus", "text_encoder", "text_encoder_plus"]
    assert by_name["unet_plus"]["lr"] == 16 * 1e-3 and by_name["text_encoder_plus"]["lr"] == 16 * 4e-4
    up = "B" if kind == "lora" else "lora_up_weight"
    fast = {id(p) for g in groups if g["name"].endswith("_plus") for p in g["params"]}
    assert {id(p) for k, p in named.items() if k.rsplit(".", 1)[1] == up} == fast
    assert sum(len(g["params"]) for g in groups) == len(named)  # DoRA's magnitude stays at the base rate
    opt = make_optimizer("adamw", groups, 0.0, "cpu")
    schedule = make_schedule(opt, "cosine", 2, 6)
    seen = []
    for _ in range(5):
        for p in named.values():
            p.grad = torch.ones_like(p)
        opt.step()
        schedule.step()
        lrs = {g["name"]: g["lr"] for g in opt.param_groups}
        seen.append(lrs["unet"])
        assert lrs["unet_plus"] == pytest.approx(16 * lrs["unet"], rel=1e-12)  # the schedule keeps the ratio
        assert lrs["text_encoder_plus"] == pytest.approx(16 * lrs["text_encoder"], rel=1e-12)
    assert seen[0] == 1e-3 and seen[-1] < 0.2e-3  # while it moves the rates (warm-up, then cosine)
    # Without a ratio: the two groups the optimizer always had.
    assert [g["name"] for g in param_groups(unet, te, 1e-3, 1e-3, None, up_factors(named))] == ["unet", "text_encoder"]


def test_loraplus_in_a_run(model_dir, shapes, tmp_path):
    tr = trainer(model_dir, shapes, tmp_path / "p", steps=3, loraplus_lr_ratio=8.0, train_text_encoder=True,
                 warmup_steps=5)
    tr.run()
    lrs = {g["name"]: g["lr"] for g in tr.optimizer.param_groups}
    assert lrs["unet"] == pytest.approx(0.8 * 3e-3, rel=1e-12)  # step 3 of a 5-step warm-up
    assert lrs["unet_plus"] == pytest.approx(8 * lrs["unet"], rel=1e-12)
    assert lrs["text_encoder_plus"] == pytest.approx(8 * lrs["text_encoder"], rel=1e-12)
    meta = safe_open(tmp_path / "p" / "lora.safetensors", "pt").metadata()
    assert json.loads(meta["ss_network_args"]) == {"loraplus_lr_ratio": "8.0"}


# -- Optimizers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["adafactor", "schedulefree"])
def test_adafactor_and_schedulefree_lower_the_loss(model_dir, shapes, tmp_path, optimizer):
    out = tmp_path / optimizer
    tr = trainer(model_dir, shapes, out, steps=60, targets="conv", lr=1e-2, optimizer=optimizer,
                 warmup_steps=5 if optimizer == "schedulefree" else 0)
    start = {k: p.detach().clone() for k, p in tr.trained.items()}
    tr.run()
    values = losses(out)
    first, last = sum(values[:10]) / 10, sum(values[-10:]) / 10
    assert last < 0.8 * first, (first, last)
    rows = [json.loads(line) for line in (out / "logs" / "train.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r]
    # Schedule-free warms up by itself (the schedule stays constant); Adafactor steps at the given rate.
    want = [1e-2 * min(1.0, (k + 1) / 5) for k in range(60)] if optimizer == "schedulefree" else [1e-2] * 60
    assert lrs == pytest.approx(want, rel=1e-12)
    assert all(not torch.equal(start[k], p) for k, p in tr.trained.items() if k.endswith(".B"))
    if optimizer == "schedulefree":
        # The file holds the optimizer's x (its eval mode), not the y it trains at.
        saved, _ = load_adapter(out / "lora.safetensors")
        y = tr.adapters.export(NAME)
        tr.optimizer.eval()
        x = tr.adapters.export(NAME)
        assert saved.modules.keys() == x.modules.keys()
        for key, m in x.modules.items():
            s = saved.modules[key]
            assert torch.equal(s.A.reshape(m.A.shape), m.A) and torch.equal(s.B.reshape(m.B.shape), m.B), key
        assert any(not torch.equal(y.modules[k].B, m.B) for k, m in x.modules.items())


# -- EMA ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("start, every", [(0, 1), (2, 1), (0, 2)])
def test_ema_is_the_closed_form_decay_average(start, every):
    d, k = 0.9, 7
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(5, generator=g) for _ in range(k + 1)]  # w_0 (the start) .. w_k (after step k)
    p = torch.nn.Parameter(ws[0].clone())
    ema = EMA({"w": p}, d, start_step=start, every=every)
    for step in range(1, k + 1):
        p.data.copy_(ws[step])
        ema.update(step)
    # e follows w up to `start`, then e ← d·e + (1-d)·w at each of the n update steps u_1..u_n:
    # e_k = d^n w_start + Σ_j (1-d) d^(n-j) w_(u_j).
    updates = [s for s in range(start + 1, k + 1) if (s - start) % every == 0]
    n = len(updates)
    want = d**n * ws[start].double() + sum((1 - d) * d ** (n - 1 - j) * ws[u].double() for j, u in enumerate(updates))
    assert torch.allclose(ema.shadow["w"].double(), want, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(ema.shadow["w"], p.detach())


def test_shipped_weights_swap_in_the_ema_or_schedulefree_x_and_restore_exactly():
    from schedulefree import AdamWScheduleFree

    p = torch.nn.Parameter(torch.randn(4, 3))
    ema = EMA({"w": p}, 0.5)
    raw = p.detach().clone()
    ema.shadow["w"].fill_(7.0)
    with shipped_weights({"w": p}, ema=ema):
        assert torch.equal(p.detach(), torch.full((4, 3), 7.0))
    assert torch.equal(p.detach(), raw)
    opt = AdamWScheduleFree([p], lr=0.1)
    opt.train()
    for _ in range(3):
        p.grad = torch.randn(4, 3, generator=torch.Generator().manual_seed(_))
        opt.step()
    y = p.detach().clone()
    with shipped_weights({"w": p}, schedule_free=opt):
        inside = p.detach().clone()
    assert torch.equal(p.detach(), y) and opt.param_groups[0]["train_mode"]
    opt.eval()
    assert torch.equal(inside, p.detach()) and not torch.equal(inside, y)


@pytest.mark.parametrize("method", [
    ["--ema", "--ema-decay", "0.8", "--loraplus-lr-ratio", "4", "--train-text-encoder", "--val-count", "2",
     "--sample-prompt", "a red circle", "--sample-steps", "1", "--sample-every", "2"],
    ["--optimizer", "schedulefree", "--warmup-steps", "3", "--val-count", "2"],
], ids=["ema+loraplus", "schedulefree"])
def test_half_then_resume_equals_a_straight_run(model_dir, shapes, tmp_path, method):
    common = ["--model", model_dir, "--data", shapes, "--save-every", 4, *method, *train_flags(lr=1e-2)]
    assert run_train(*common, "--steps", 8, "--output", tmp_path / "straight") == 0
    assert run_train(*common, "--steps", 4, "--output", tmp_path / "half") == 0  # ends with a checkpoint at 4
    assert run_train(*common, "--steps", 8, "--output", tmp_path / "half", "--resume", "latest") == 0
    names = ["lora.safetensors"] + (["lora-raw.safetensors"] if "--ema" in method else [])
    for name in names:
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "half" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    if "--ema" in method:
        ema, raw = (load_file(tmp_path / "straight" / n) for n in names)
        assert any(not torch.equal(ema[k], raw[k]) for k in ema if k.endswith("lora_up.weight"))
        assert (tmp_path / "half" / "checkpoints" / "step-0000004" / "ema.safetensors").is_file()


# -- Options together, metadata and config errors ----------------------------------------------------
def test_methods_together_record_kohyas_metadata(vpred_dir, shapes, tmp_path):
    out = tmp_path / "all"
    assert run_train("--model", vpred_dir, "--data", shapes, "--output", out, "--steps", 6, "--loss", "smooth_l1",
                     "--huber-c", "0.2", "--huber-schedule", "exponential", "--multires-noise-iterations", 4,
                     "--multires-noise-discount", 0.5, "--debiased-estimation", "--min-snr-gamma", 5,
                     "--timestep-sampling", "logit_normal", "--logit-mean", 0.3, "--timestep-bias", "later",
                     "--timestep-bias-multiplier", 2, "--min-timestep", 50, "--max-timestep", 950,
                     "--zero-terminal-snr", "--optimizer", "adafactor", *train_flags()) == 0
    assert all(math.isfinite(v) and v > 0 for v in losses(out))
    meta = safe_open(out / "lora.safetensors", "pt").metadata()
    assert {k: meta[k] for k in ("ss_loss_type", "ss_huber_c", "ss_huber_schedule", "ss_multires_noise_iterations",
                                 "ss_multires_noise_discount", "ss_debiased_estimation", "ss_min_snr_gamma",
                                 "ss_zero_terminal_snr", "ss_optimizer")} == {
        "ss_loss_type": "smooth_l1", "ss_huber_c": "0.2", "ss_huber_schedule": "exponential",
        "ss_multires_noise_iterations": "4", "ss_multires_noise_discount": "0.5", "ss_debiased_estimation": "True",
        "ss_min_snr_gamma": "5.0", "ss_zero_terminal_snr": "True", "ss_optimizer": "adafactor"}
    assert json.loads(meta["imglora.config"])["timestep_sampling"] == "logit_normal"


@pytest.mark.parametrize("options, message", [
    (dict(min_timestep=500, max_timestep=500), "--min-timestep 500 is not below --max-timestep 500"),
    (dict(logit_std=2.0), "--logit-std needs --timestep-sampling logit_normal"),
    (dict(timestep_bias_multiplier=2.0), "--timestep-bias-multiplier needs --timestep-bias"),
    (dict(huber_c=0.3, huber_schedule="constant"), "--huber-c and --huber-schedule need --loss huber"),
    (dict(multires_noise_discount=0.5), "--multires-noise-discount needs --multires-noise-iterations"),
    (dict(loraplus_lr_ratio=16.0, adapter="loha"), "--loraplus-lr-ratio works with --adapter lora or dora"),
    (dict(optimizer="schedulefree", lr_scheduler="cosine"), "--optimizer schedulefree replaces the schedule"),
    (dict(ema_decay=0.99), "--ema-decay needs --ema"),
    (dict(ema=True, ema_decay=1.0), "--ema-decay must be below 1"),
    (dict(ema=True, optimizer="schedulefree"), "--ema with --optimizer schedulefree"),
    (dict(logit_std=0.0, timestep_sampling="logit_normal"), "--logit-std must be above 0"),
    (dict(huber_c=1.5, loss="huber"), "--huber-c must be above 0 and at most 1"),
    (dict(ema_update_every=0, ema=True), "--ema-update-every must be at least 1"),
])
def test_bad_combinations_are_one_clear_error(options, message):
    with pytest.raises(ImgloraError) as e:
        TrainConfig(data="x", **options).check()
    assert message in e.value.line()
    TrainConfig(data="x").check()  # the defaults are fine


def test_a_timestep_range_beyond_the_model_is_an_error_naming_it():
    with pytest.raises(ImgloraError, match=r"not inside the model's \[0, 1000\)"):
        TimestepSampler(1000, 0, 1200)

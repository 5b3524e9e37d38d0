"""The judge: a small CNN of ours that names the colour, shape and background of a 64 px image.

It scores generations (base quality, the demo, the quality benchmark), so it is trained on synthetic
renders of every shape (BASE_SHAPES + NEW_SHAPES) with augmentations that imitate generation
artefacts: noise, blotchy low-frequency noise, blur, slight colour shifts. Train it with
`python -m imglora.synthetic.judge --out FILE`; the shipped weights are imglora/assets/judge.safetensors.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ..errors import ImgloraError
from ..formats.files import write_safetensors
from .shapes import BACKGROUNDS, BASE_SHAPES, CAPTION, COLOURS, NEW_SHAPES, render, samples

JUDGE_PATH = Path(__file__).resolve().parent.parent / "assets" / "judge.safetensors"
SIZE = 64  # pixels; other sizes are resized first
HEADS = {"colour": tuple(COLOURS), "shape": BASE_SHAPES + NEW_SHAPES, "background": tuple(BACKGROUNDS)}


class JudgeNet(nn.Module):
    """Five 3x3 conv layers (64 -> 8 px), global average and max pooling, one linear head per label."""

    def __init__(self, heads: dict[str, tuple[str, ...]] = HEADS, width: int = 24):
        super().__init__()
        c = [3, width, 2 * width, 2 * width, 3 * width, 4 * width]
        layers = []
        for i in range(5):
            # stride 2 on the first layer (64 -> 32), then a max pool after the 2nd and 4th (-> 8)
            layers += [nn.Conv2d(c[i], c[i + 1], 3, stride=2 if i == 0 else 1, padding=1), nn.BatchNorm2d(c[i + 1]),
                       nn.ReLU(inplace=True)]
            if i in (1, 3):
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({k: nn.Linear(2 * c[-1], len(v)) for k, v in heads.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)  # (batch, 96, 8, 8)
        h = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return {k: head(h) for k, head in self.heads.items()}


def to_batch(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (n, 3, 64, 64) floats in [0, 1]."""
    arrays = [np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
                         if im.size != (SIZE, SIZE) else im.convert("RGB")) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


@dataclass
class Judge:
    net: JudgeNet
    heads: dict[str, tuple[str, ...]]

    @torch.no_grad()
    def predict(self, images: list[Image.Image], batch: int = 256) -> list[dict[str, str]]:
        """One {colour, shape, background} dict per image."""
        out: list[dict[str, str]] = []
        for i in range(0, len(images), batch):
            logits = self.net(to_batch(images[i:i + batch]))
            best = {k: v.argmax(dim=1).tolist() for k, v in logits.items()}
            out += [{k: self.heads[k][best[k][j]] for k in self.heads} for j in range(len(best["colour"]))]
        return out


def load_judge(path: str | Path = JUDGE_PATH) -> Judge:
    """The shipped judge (or another trained by `train_judge`)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ImgloraError("the judge's weights are missing",
                           "reinstall imglora, or train them: python -m imglora.synthetic.judge --out FILE", path=path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    heads = {k: tuple(v) for k, v in json.loads(meta.get("heads", json.dumps(HEADS))).items()}
    net = JudgeNet(heads, width=int(meta.get("width", 24)))
    net.load_state_dict(state)
    return Judge(net.eval(), heads)


def render_labelled(n: int, seed: int, shapes=HEADS["shape"]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`n` synthetic renders as (n, 3, 64, 64) uint8 and their label indices, balanced over shape x colour."""
    rng = random.Random(seed + 1)
    labels = samples(n, seed, shapes=shapes)
    pixels = np.stack([np.asarray(render(s.shape, s.colour, s.background, SIZE, rng)) for s in labels])
    y = {k: torch.tensor([HEADS[k].index(getattr(s, k)) for s in labels]) for k in HEADS}
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), y


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(2 * sigma + 0.5))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def augment(x: torch.Tensor, gen: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Generation artefacts on [0, 1] images: colour shifts, blur, pixel noise and blotchy 8x8 noise."""
    b = x.shape[0]

    def u(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(shape, generator=gen)

    x = (x - 0.5) * u(b, 1, 1, 1, lo=1 - 0.12 * strength, hi=1 + 0.08 * strength) + 0.5  # contrast
    x = x + u(b, 3, 1, 1, lo=-0.05, hi=0.05) * strength  # tint
    quarter = b // 4
    for i, sigma in enumerate((0.0, 0.5, 0.8, 1.2)):  # a quarter of the batch each, from sharp to soft
        if sigma:
            part = slice(i * quarter, b if i == 3 else (i + 1) * quarter)
            x[part] = _blur(x[part], sigma * strength)
    x = x + u(b, 1, 1, 1, hi=0.08) * strength * torch.randn(x.shape, generator=gen)
    blotches = F.interpolate(torch.randn((b, 3, 8, 8), generator=gen), size=x.shape[-2:], mode="bilinear",
                             align_corners=False)
    x = x + u(b, 1, 1, 1, hi=0.08) * strength * blotches
    return x.clamp(0, 1)


@torch.no_grad()
def accuracy(net: JudgeNet, pixels: torch.Tensor, y: dict[str, torch.Tensor], gen: torch.Generator | None = None,
             batch: int = 500) -> dict[str, float]:
    """Per-head accuracy on uint8 renders, with artefacts when `gen` is given."""
    net.eval()
    right = {k: 0 for k in y}
    for i in range(0, len(pixels), batch):
        x = pixels[i:i + batch].float() / 255.0
        logits = net(augment(x, gen) if gen is not None else x)
        for k in y:
            right[k] += int((logits[k].argmax(1) == y[k][i:i + batch]).sum())
    return {k: right[k] / len(pixels) for k in y}


def train_judge(out: str | Path, seed: int = 0, images: int = 24_000, steps: int = 2000, batch: int = 64,
                lr: float = 3e-3, threads: int = 2, log=print) -> dict:
    """Train on fresh renders with artefacts, check on held-out renders (another seed), save to `out`."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    pixels, y = render_labelled(images, seed)
    net = JudgeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    bar = tqdm(range(steps), desc="judge", unit="step", mininterval=2.0)
    for step in bar:
        net.train()
        idx = torch.randint(0, images, (batch,), generator=gen)
        logits = net(augment(pixels[idx].float() / 255.0, gen))
        loss = sum(F.cross_entropy(logits[k], y[k][idx]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    net.eval()
    test_pixels, test_y = render_labelled(2000, seed + 1000)  # held out: another seed
    result = {"clean": accuracy(net, test_pixels, test_y),
              "artefacts": accuracy(net, test_pixels, test_y, torch.Generator().manual_seed(seed + 1)),
              "seconds": round(time.perf_counter() - t0, 1)}
    meta = {"heads": json.dumps(HEADS), "width": "24", "held_out_accuracy": json.dumps(result),
            "recipe": json.dumps(dict(seed=seed, images=images, steps=steps, batch=batch, lr=lr))}
    write_safetensors(out, {k: v.contiguous() for k, v in net.state_dict().items()}, metadata=meta, overwrite=True)
    log(f"wrote {out}: held-out accuracy {json.dumps(result)}")
    return result


def base_prompts(backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)) -> list[tuple[str, dict[str, str]]]:
    """Every base shape x colour (x background) caption with its labels."""
    return [(CAPTION.format(colour=c, shape=s, background=b), dict(colour=c, shape=s, background=b))
            for s in BASE_SHAPES for c in COLOURS for b in backgrounds]


@torch.no_grad()
def evaluate(model, prompts_with_labels: list[tuple[str, dict[str, str]]], seeds: int = 4, steps: int = 25,
             guidance: float = 4.0, judge: Judge | None = None, keep_images: bool = False) -> dict:
    """Generate every prompt with seeds 0..seeds-1 through `generate` (the one generation path) and score it.

    Returns the share of images whose judged label equals the prompted one, per label kind present in
    the labels ("colour", "shape", "background"), "all" (every given label right), per-shape and
    per-colour breakdowns, and with `keep_images` the images and predictions.
    """
    from ..generate import GenerateArgs, generate

    judge = judge or load_judge()
    jobs = [(p, labels, s) for p, labels in prompts_with_labels for s in range(seeds)]
    images = []
    for prompt, _ in prompts_with_labels:
        images += generate(model, GenerateArgs(prompt, seed=0, steps=steps, guidance=guidance, batch=seeds))
    preds = judge.predict(images)
    result: dict = {"n": len(jobs), "steps": steps, "guidance": guidance}
    for kind in ("colour", "shape", "background"):
        scored = [p[kind] == labels[kind] for p, (_, labels, _) in zip(preds, jobs) if kind in labels]
        if scored:
            result[kind] = round(sum(scored) / len(scored), 4)
    result["all"] = round(sum(all(p[k] == v for k, v in labels.items()) for p, (_, labels, _) in zip(preds, jobs))
                          / len(jobs), 4)
    for kind, by in (("shape", "by_shape"), ("colour", "by_colour")):
        groups: dict[str, list[bool]] = {}
        for p, (_, labels, _) in zip(preds, jobs):
            if kind in labels:
                groups.setdefault(labels[kind], []).append(all(p[k] == v for k, v in labels.items()))
        if groups:
            result[by] = {k: round(sum(v) / len(v), 3) for k, v in groups.items()}
    if keep_images:
        result["images"], result["predictions"] = images, preds
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m imglora.synthetic.judge", description="train the judge")
    p.add_argument("--out", type=Path, default=JUDGE_PATH, help="the .safetensors file to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=24_000, help="training renders")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    train_judge(a.out, seed=a.seed, images=a.images, steps=a.steps, threads=a.threads)


if __name__ == "__main__":
    main()

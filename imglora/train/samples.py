"""What a run shows while it trains: sample images (through the app's generate path) and validation loss."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ImgloraError
from ..generate import GenerateArgs, generate, image_grid, parameters_text, save_png
from ..lora.state import Blend


class RunLog:
    """Metrics to a JSONL file and TensorBoard event files (main process only).

    Each run has logs of its own: a new run first moves the previous run's `train.jsonl` and `tensorboard/`
    aside as `train-<time>.jsonl` and `tensorboard-<time>/` (the time they were last written), so
    `tensorboard --logdir OUTPUT/logs` shows the runs side by side; a resumed run (`resume`) continues them."""

    def __init__(self, folder: Path, enabled: bool, resume: bool = False):
        self.enabled = enabled
        self.writer = None
        if enabled:
            folder.mkdir(parents=True, exist_ok=True)
            if not resume:
                self.rotate(folder)
            self.jsonl = open(folder / "train.jsonl", "a", encoding="utf-8")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(folder / "tensorboard"))
            except ImportError:  # tensorboard is a dependency, but a broken install should not stop training
                self.writer = None

    @staticmethod
    def rotate(folder: Path) -> list[Path]:
        """Move the previous run's logs aside; returns their new names."""
        old = [p for p in (folder / "train.jsonl", folder / "tensorboard") if p.exists()]
        if not old:
            return []
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(max(p.stat().st_mtime for p in old)))
        for n in range(1000):
            tag = stamp if n == 0 else f"{stamp}-{n}"
            moved = [p.with_name(f"{p.stem}-{tag}{p.suffix}") for p in old]
            if not any(m.exists() for m in moved):
                break
        for p, m in zip(old, moved):
            p.rename(m)
        return moved

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.writer is not None:
                self.writer.close()


@dataclass
class SamplePrompt:
    """One line of a sample-prompt file, with kohya's per-prompt options applied."""

    prompt: str
    negative: str = ""
    width: int | None = None  # None: the run's resolution
    height: int | None = None
    seed: int | None = None  # None: the run's seed
    steps: int | None = None  # None: --sample-steps, else the model's
    guidance: float | None = None


# kohya sd-scripts' options inside a sample prompt: `a cat --n blurry --w 512 --h 768 --d 42 --l 7 --s 28`
_OPTION = re.compile(r"\s--(n|w|h|d|l|s)\s+")
_FIELDS = {"n": ("negative", str), "w": ("width", int), "h": ("height", int), "d": ("seed", int),
           "l": ("guidance", float), "s": ("steps", int)}


def parse_sample_prompt(line: str, where: str = "sample prompt") -> SamplePrompt:
    """'a cat --n blurry --w 512' -> SamplePrompt('a cat', negative='blurry', width=512). Width and
    height are rounded down to a multiple of 8 (the VAE's), as kohya does; a bad value is an error."""
    parts = _OPTION.split(" " + line.strip())
    sample = SamplePrompt(parts[0].strip())
    for key, value in zip(parts[1::2], parts[2::2]):
        field_name, kind = _FIELDS[key]
        value = value.strip()
        try:
            parsed = kind(value)
        except ValueError:
            raise ImgloraError(f"{where}: --{key} needs a number, got {value!r}", "fix the sample prompt") from None
        if key in ("w", "h"):
            if parsed < 8:
                raise ImgloraError(f"{where}: --{key} {value} is too small", "give a size of at least 8 pixels")
            parsed = parsed // 8 * 8
        if key == "s" and parsed < 1:
            raise ImgloraError(f"{where}: --s needs at least 1 step")
        setattr(sample, field_name, parsed)
    if not sample.prompt:
        raise ImgloraError(f"{where}: the prompt before the options is empty", "put the prompt first")
    return sample


def read_sample_prompts(prompts: list[str], file: str | None) -> list[SamplePrompt]:
    """The --sample-prompt values and the lines of the prompts file (blank lines and # comments skipped),
    read and checked when the run starts, so a bad file never costs a finished run."""
    out = [parse_sample_prompt(p) for p in prompts]
    if file:
        try:
            lines = Path(file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ImgloraError(f"cannot read the sample prompts ({getattr(e, 'strerror', None) or e})",
                               "fix --sample-prompts-file or leave it out", path=file) from None
        out += [parse_sample_prompt(line, f"{file} line {i}") for i, line in enumerate(lines, 1)
                if line.strip() and not line.lstrip().startswith("#")]
    return out


def render_samples(model, adapters, name: str, label: str, prompts: list[SamplePrompt], folder: Path, step: int,
                   seed: int, steps: int | None, guidance: float | None, resolution: int,
                   weights=(0.0, 1.0)) -> Path:
    """For each prompt, the base and the adapter side by side (one batched pass per prompt), as one grid.
    `name` is the adapter in `adapters`; `label` is what the files and PNG parameters call it (the run's name)."""
    images, labels = [], []
    for p in prompts:
        args = GenerateArgs(p.prompt, p.negative, seed=seed if p.seed is None else p.seed,
                            steps=p.steps or steps, guidance=guidance if p.guidance is None else p.guidance,
                            width=p.width or resolution, height=p.height or resolution,
                            blends=[{name: w} for w in weights])
        row = generate(model, args, adapters)
        for w, image in zip(weights, row):
            save_png(image, folder / f"step-{step:07d}" / f"{len(images):02d}-{label}-w{w:g}.png",
                     parameters_text(model, args, args.seed, Blend({label: w})), overwrite=True)
            images.append(image)
            labels.append("base" if w == 0 else f"{label} {w:g}")
    grid = image_grid(images, cols=len(weights), labels=labels, row_labels=[p.prompt for p in prompts])
    grid_path = folder / f"step-{step:07d}.png"
    save_png(grid, grid_path, "\n".join(p.prompt for p in prompts), overwrite=True)
    return grid_path


@torch.no_grad()
def validation_loss(batches, loss_fn) -> float:
    """Mean loss over held-out batches at fixed timesteps and fixed noise (the same every time)."""
    total, n = 0.0, 0
    for batch in batches:
        total += float(loss_fn(batch)) * batch["size"]
        n += batch["size"]
    return total / max(1, n)

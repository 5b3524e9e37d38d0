"""What a run shows while it trains: sample images (through the app's generate path) and validation loss."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..generate import GenerateArgs, generate, image_grid, parameters_text, save_png
from ..lora.state import Blend


class RunLog:
    """Metrics to a JSONL file and TensorBoard event files (main process only)."""

    def __init__(self, folder: Path, enabled: bool):
        self.enabled = enabled
        self.writer = None
        if enabled:
            folder.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(folder / "train.jsonl", "a", encoding="utf-8")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(folder / "tensorboard"))
            except ImportError:  # tensorboard is a dependency, but a broken install should not stop training
                self.writer = None

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


def render_samples(model, adapters, name: str, prompts: list[str], folder: Path, step: int, seed: int,
                   steps: int | None, guidance: float | None, weights=(0.0, 1.0)) -> Path:
    """For each prompt, the base and the adapter side by side (one batched pass per prompt), as one grid."""
    images, labels = [], []
    for prompt in prompts:
        args = GenerateArgs(prompt, seed=seed, steps=steps, guidance=guidance, blends=[{name: w} for w in weights])
        row = generate(model, args, adapters)
        for w, image in zip(weights, row):
            save_png(image, folder / f"step-{step:07d}" / f"{len(images):02d}-w{w:g}.png",
                     parameters_text(model, args, seed, Blend({name: w})), overwrite=True)
            images.append(image)
            labels.append(f"w={w:g}")
    grid = image_grid(images, cols=len(weights), labels=labels, row_labels=[p[:40] for p in prompts])
    grid_path = folder / f"step-{step:07d}.png"
    save_png(grid, grid_path, "\n".join(prompts), overwrite=True)
    return grid_path


@torch.no_grad()
def validation_loss(batches, loss_fn) -> float:
    """Mean loss over held-out batches at fixed timesteps and fixed noise (the same every time)."""
    total, n = 0.0, 0
    for batch in batches:
        total += float(loss_fn(batch)) * batch["size"]
        n += batch["size"]
    return total / max(1, n)

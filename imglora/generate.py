"""The one generation path: the CLI, training samples and the app all call `generate`.

It runs the diffusers pipeline itself with the model's own scheduler and CPU generators, so an
image equals what diffusers gives for the same arguments and adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .formats.files import atomic_write
from .lora.adapters import Adapters
from .lora.state import Blend
from .pipeline import Model


@dataclass
class GenerateArgs:
    prompt: str
    negative: str = ""
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    batch: int = 1
    blends: list | None = None  # one Blend (or {name: weight}) per image: a comparison grid
    blend: Blend = field(default_factory=Blend)  # the blend; applied when it has adapters, and in the PNG text


def resolved(model: Model, args: GenerateArgs) -> GenerateArgs:
    """Fill unset steps/guidance/size from the model's defaults (imglora.json), then diffusers' own."""
    d, size = model.defaults, model.resolution
    return GenerateArgs(
        prompt=args.prompt, negative=args.negative, seed=args.seed,
        steps=args.steps or d.get("steps", 50),
        guidance=args.guidance if args.guidance is not None else d.get("guidance", 5.0 if model.arch == "sdxl" else 7.5),
        width=args.width or size, height=args.height or size, batch=args.batch, blends=args.blends,
        blend=args.blend)


@torch.no_grad()
def generate(model: Model, args: GenerateArgs, adapters: Adapters | None = None,
             progress: bool = False) -> list[Image.Image]:
    """Images for one prompt. With `blends`, image i uses blends[i] in the same forward pass, all with
    the same seed, so a grid differs only by blend; otherwise image i uses seed + i, with `blend` applied
    (when it names adapters). A blend with a schedule changes its weights between steps, as diffusers'
    callback_on_step_end would with set_adapters."""
    a = resolved(model, args)
    pipe = model.pipe
    n = len(a.blends) if a.blends else a.batch
    seeds = [a.seed] * n if a.blends else [a.seed + i for i in range(n)]
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    rows = [b if isinstance(b, Blend) else Blend(dict(b)) for b in a.blends] if a.blends else None
    if (rows or a.blend) and adapters is None:
        raise ValueError("blends need the pipeline's adapters")

    def at(step: int) -> None:
        if rows:
            adapters.set_sample_weights(rows, step, a.steps)
        elif a.blend:
            adapters.apply(a.blend, step, a.steps)

    at(0)
    scheduled = any(b.scheduled for b in rows) if rows else a.blend.scheduled

    def next_step(pipe, i, t, kwargs):  # after step i: the weights of step i + 1
        if i + 1 < a.steps:
            at(i + 1)
        return kwargs

    pipe.set_progress_bar_config(disable=not progress)
    try:
        out = pipe(prompt=[a.prompt] * n, negative_prompt=[a.negative] * n if a.negative else None,
                   num_inference_steps=a.steps, guidance_scale=a.guidance, width=a.width, height=a.height,
                   generator=generators[0] if n == 1 else generators,
                   callback_on_step_end=next_step if scheduled else None)
    finally:
        if rows:
            adapters.set_sample_weights(None)
        elif scheduled:
            at(0)
    return out.images


def parameters_text(model: Model, args: GenerateArgs, seed: int, blend: Blend | None = None) -> str:
    """A1111's `parameters` PNG text; adapters appear as <lora:name:weight> in the prompt."""
    a = resolved(model, args)
    prompt = f"{a.prompt} {(blend if blend is not None else a.blend).tags()}".strip()
    sampler = type(model.pipe.scheduler).__name__.replace("Scheduler", "").replace("Discrete", "")
    lines = [prompt]
    if a.negative:
        lines.append(f"Negative prompt: {a.negative}")
    lines.append(f"Steps: {a.steps}, Sampler: {sampler}, CFG scale: {a.guidance:g}, Seed: {seed}, "
                 f"Size: {a.width}x{a.height}, Model: {model.name}, Version: imglora")
    return "\n".join(lines)


def save_png(image: Image.Image, path, parameters: str, overwrite: bool = False):
    """Write a PNG atomically, with its generation parameters in the `parameters` text chunk."""
    info = PngInfo()
    info.add_text("parameters", parameters)
    return atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=info), overwrite=overwrite)


def image_grid(images: list[Image.Image], cols: int, labels: list[str] | None = None,
               row_labels: list[str] | None = None, wrap: int = 40) -> Image.Image:
    """Images in a grid, each with an optional caption strip under it; row labels (prompts) on the left,
    wrapped at `wrap` characters a line rather than cut."""
    import textwrap

    from PIL import ImageDraw

    w, h = images[0].size
    strip = 14 if labels else 0
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    rows = (len(images) + cols - 1) // cols
    wrapped = ["\n".join(textwrap.wrap(t, wrap)) or " " for t in (row_labels or [])]
    boxes = [measure.multiline_textbbox((0, 0), t) for t in wrapped]
    left = max((b[2] for b in boxes), default=0) + 6 if row_labels else 0
    row_h = max([h + strip] + [b[3] + 6 for b in boxes])
    grid = Image.new("RGB", (left + cols * w, rows * row_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        x, y = left + (i % cols) * w, (i // cols) * row_h
        grid.paste(img.convert("RGB").resize((w, h)), (x, y))
        if labels:
            draw.text((x + 2, y + h + 1), labels[i][: max(8, w // 5)], fill="black")
    for r, (text, box) in enumerate(zip(wrapped, boxes)):
        draw.multiline_text((2, r * row_h + max(0, (h - box[3]) // 2)), text, fill="black")
    return grid

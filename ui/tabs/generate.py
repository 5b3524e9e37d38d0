"""Generate tab: prompt, settings, the gallery; images saved with their A1111-style parameters."""

from __future__ import annotations

import random
from functools import partial

import gradio as gr

from imglora.errors import ImgloraError
from imglora.generate import GenerateArgs, generate, parameters_text, resolved

from ..blend import active_weights, parse_prompt, summary
from ..messages import in_page
from ..session import SCHEDULERS, Session

MAX_BATCH = 8
MAX_SEED = 2**32 - 1


def check_settings(steps, guidance, width, height, seed) -> tuple[int, float, int, int, int]:
    """Numbers from the page or the API, checked: a bad one is a message, not a crash in diffusers."""
    try:
        steps, guidance, width, height, seed = int(steps), float(guidance), int(width), int(height), int(seed)
    except (TypeError, ValueError):
        raise ImgloraError("steps, guidance, width, height and seed must be numbers", "fix the settings") from None
    if not 1 <= steps <= 150:
        raise ImgloraError(f"{steps} steps is out of range", "use 1 to 150 steps")
    if not 0 <= guidance <= 30:
        raise ImgloraError(f"guidance {guidance:g} is out of range", "use 0 to 30")
    for what, v in (("width", width), ("height", height)):
        if not 16 <= v <= 2048 or v % 8:
            raise ImgloraError(f"{what} {v} is not usable", "use a multiple of 8 from 16 to 2048")
    if not 0 <= seed <= MAX_SEED:
        raise ImgloraError(f"seed {seed} is out of range", f"use 0 to {MAX_SEED}, or tick 'random seed'")
    return steps, guidance, width, height, seed


def run_generate(session: Session, blend: dict | None, prompt: str, negative: str = "", steps=20, guidance=7.5,
                 seed=0, randomize: bool = False, width=512, height=512, scheduler: str = "model default",
                 batch=1, merge: bool = False):
    """Generate with the user's blend plus any <lora:name:w> in the prompt; save every image.

    Returns (gallery items [(path, caption)], the seed used, the first image's parameters text).
    """
    if randomize:
        seed = random.randint(0, MAX_SEED - MAX_BATCH)
    steps, guidance, width, height, seed = check_settings(steps, guidance, width, height, seed)
    try:
        batch = int(batch)
    except (TypeError, ValueError):
        raise ImgloraError(f"batch size {batch!r} is not a number", f"use 1 to {MAX_BATCH}") from None
    if not 1 <= batch <= MAX_BATCH:
        raise ImgloraError(f"batch size {batch} is out of range", f"use 1 to {MAX_BATCH}")
    text, prompt_loras = parse_prompt(prompt)
    weights = active_weights(session.catalogue, blend, prompt_loras)
    args = GenerateArgs(text, negative or "", seed, steps, guidance, width, height, batch=batch, blend=weights)
    with session.using(weights, merge=merge, scheduler=scheduler) as model:
        images = generate(model, args, session.adapters)
        # parameters_text reads the scheduler's name, so it is written while this one is set.
        texts = [parameters_text(model, args, seed + i) for i in range(len(images))]
    items = []
    for i, (image, params) in enumerate(zip(images, texts)):
        path = session.save_image(image, params)
        items.append((str(path), f"seed {seed + i}"))
    return items, seed, texts[0] + f"\nAdapters: {summary(weights)}"


def defaults(session: Session) -> GenerateArgs:
    return resolved(session.model, GenerateArgs(""))


def create_ui(session: Session, blend: gr.State):
    d = defaults(session)
    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt",
                                placeholder="a photo of ... <lora:name:0.8> enables an adapter by name")
            negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative")
        go = gr.Button("Generate", variant="primary", elem_id="generate", scale=1)
    with gr.Row():
        steps = gr.Slider(1, 150, value=d.steps, step=1, label="Steps", elem_id="steps")
        guidance = gr.Slider(0, 30, value=d.guidance, step=0.5, label="Guidance (CFG)", elem_id="guidance")
        scheduler = gr.Dropdown(list(SCHEDULERS), value="model default", label="Scheduler", elem_id="scheduler")
    with gr.Row():
        width = gr.Slider(16, 2048, value=d.width, step=8, label="Width", elem_id="width")
        height = gr.Slider(16, 2048, value=d.height, step=8, label="Height", elem_id="height")
        batch = gr.Slider(1, MAX_BATCH, value=1, step=1, label="Batch size", elem_id="batch")
    with gr.Row():
        seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
        randomize = gr.Checkbox(value=False, label="Random seed", elem_id="randomize")
        merge = gr.Checkbox(value=False, label="Merge for speed (folds the blend into the weights)",
                            elem_id="merge")
    gallery = gr.Gallery(label="Images", format="png", columns=4, elem_id="gallery")
    info = gr.Textbox(label="Parameters", lines=3, interactive=False, elem_id="parameters")
    seed_used = gr.Number(label="Seed used", precision=0, interactive=False, visible=False)
    inputs = [blend, prompt, negative, steps, guidance, seed, randomize, width, height, scheduler, batch, merge]
    go.click(in_page(partial(run_generate, session)), inputs, [gallery, seed_used, info], api_name="generate",
             concurrency_id="pipeline", concurrency_limit=1)
    return {"prompt": prompt, "negative": negative, "steps": steps, "guidance": guidance, "seed": seed,
            "width": width, "height": height, "scheduler": scheduler}

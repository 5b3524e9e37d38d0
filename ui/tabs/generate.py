"""Generate tab: prompt, settings, the gallery; images saved with their A1111-style parameters."""

from __future__ import annotations

import random
from functools import partial

import gradio as gr

from imglora.errors import ImgloraError
from imglora.generate import GenerateArgs, generate, parameters_text, resolved

from ..blend import active_weights, from_options, parse_prompt, pins, summary
from ..messages import in_page, on_pipeline, user_of, warn
from ..pnginfo import read_parameters, to_settings
from ..session import SCHEDULERS, Job, Limits, Session

MAX_SEED = 2**32 - 1


def check_settings(steps, guidance, width, height, seed, limits: Limits | None = None) -> tuple[int, float, int, int, int]:
    """Numbers from the page or the API, checked: a bad one is a message, not a crash in diffusers."""
    limits = limits or Limits()
    try:
        steps, guidance, width, height, seed = int(steps), float(guidance), int(width), int(height), int(seed)
    except (TypeError, ValueError, OverflowError):
        raise ImgloraError("steps, guidance, width, height and seed must be numbers", "fix the settings") from None
    if not 1 <= steps <= limits.steps:
        raise ImgloraError(f"{steps} steps is out of range", f"use 1 to {limits.steps} steps")
    if not 0 <= guidance <= 30:
        raise ImgloraError(f"guidance {guidance:g} is out of range", "use 0 to 30")
    for what, v in (("width", width), ("height", height)):
        if not 16 <= v <= limits.side or v % 8:
            raise ImgloraError(f"{what} {v} is not usable", f"use a multiple of 8 from 16 to {limits.side}")
    if not 0 <= seed <= MAX_SEED:
        raise ImgloraError(f"seed {seed} is out of range", f"use 0 to {MAX_SEED}, or tick 'random seed'")
    return steps, guidance, width, height, seed


def check_images(n: int, width: int, height: int, limits: Limits, what: str = "images") -> None:
    """One batch's pixels are bounded, so that no request holds the model (and its memory) for long."""
    mp = n * width * height / 1e6
    if mp > limits.megapixels:
        raise ImgloraError(f"{n} {what} of {width}x{height} is {mp:.1f} megapixels in one batch, over the limit of "
                           f"{limits.megapixels:g}", f"use fewer {what} or a smaller size")


def run_generate(session: Session, blend: dict | None, prompt: str, negative: str = "", steps=20, guidance=7.5,
                 seed=0, randomize: bool = False, width=512, height=512, scheduler: str = "model default",
                 batch=1, merge: bool = False, job: Job | None = None):
    """Generate with the user's blend plus any <lora:name:w> in the prompt; save every image.

    Returns (gallery items [(path, caption)], the seed used, the first image's parameters text).
    Everything is checked before the request waits for its turn on the model.
    """
    limits = session.limits
    if randomize:
        seed = random.randint(0, MAX_SEED - limits.images)
    steps, guidance, width, height, seed = check_settings(steps, guidance, width, height, seed, limits)
    try:
        batch = int(batch)
    except (TypeError, ValueError, OverflowError):
        raise ImgloraError(f"batch size {batch!r} is not a number", f"use 1 to {limits.images}") from None
    if not 1 <= batch <= limits.images:
        raise ImgloraError(f"batch size {batch} is out of range", f"use 1 to {limits.images}")
    check_images(batch, width, height, limits)
    text, prompt_loras = parse_prompt(prompt)
    weights = active_weights(session.catalogue, blend, prompt_loras)
    args = GenerateArgs(text, negative or "", seed, steps, guidance, width, height, batch=batch, blend=weights)
    job = job or Job()
    job.steps = steps
    with session.using(weights, merge=merge, scheduler=scheduler, pins=pins(blend), job=job) as model:
        images = generate(model, args, session.adapters)
        # parameters_text reads the scheduler's name, so it is written while this one is set.
        texts = [parameters_text(model, args, seed + i) for i in range(len(images))]
    items = []
    for i, (image, params) in enumerate(zip(images, texts)):
        path = session.save_image(image, params)
        items.append((str(path), f"seed {seed + i}"))
    note = " (not merged: a step schedule changes the weights between steps)" if merge and weights.scheduled else ""
    return items, seed, texts[0] + f"\nAdapters: {summary(weights)}{note}"


def _generate_for_page(session: Session, *inputs, job: Job):
    """run_generate, with the gallery served from Gradio's cache and every image's parameters kept for
    the gallery's select event."""
    items, seed, text = run_generate(session, *inputs, job=job)
    texts = [read_parameters(path) for path, _ in items]
    return [(session.shown(path), caption) for path, caption in items], seed, text, texts


def show_selected(texts, evt: gr.SelectData):
    """The parameters of the image clicked in the gallery."""
    if texts and evt is not None and isinstance(evt.index, int) and 0 <= evt.index < len(texts):
        return texts[evt.index]
    return gr.skip()


def sampler_name(scheduler) -> str:
    """The name parameters_text writes for a scheduler."""
    return type(scheduler).__name__.replace("Scheduler", "").replace("Discrete", "")


def read_png(file) -> str:
    if not file:
        return ""
    return read_parameters(file if isinstance(file, str) else file.name)


def send_to_generate(session: Session, blend: dict | None, text: str):
    """PNG info -> the Generate settings, and a blend of the prompt's adapters at their weights."""
    settings, loras, notes = to_settings(session.catalogue, text, sampler_name(session._default_scheduler))
    new = {}
    for name, o in loras.items():
        new = from_options(session.catalogue, new, name, o)
    message = f"Sent to Generate with {summary(active_weights(session.catalogue, new))}."
    if notes:
        message += " Left out: " + ", ".join(notes) + "."
    if blend and set(blend) != set(new):
        message += " The blend was replaced by the image's."
    return settings, new, message
def defaults(session: Session) -> GenerateArgs:
    return resolved(session.model, GenerateArgs(""))


# Every event that runs the model: up to 8 wait in Session.turns (threads), which picks the next fairly
# and runs one at a time; the rest wait in Gradio's first-come queue.
PIPELINE = {"concurrency_id": "pipeline", "concurrency_limit": 8}


def create_ui(session: Session, blend: gr.State, panel: dict):
    """panel: the adapters panel's `enabled` and `current` components, which a sent PNG's blend updates."""
    d, limits = defaults(session), session.limits
    with gr.Row(equal_height=True):
        with gr.Column(scale=5):
            prompt = gr.Textbox(label="Prompt", lines=2, max_lines=8, elem_id="prompt",
                                placeholder="a photo of ... <lora:name:0.8> enables an adapter by name")
            negative = gr.Textbox(label="Negative prompt", lines=1, max_lines=4, elem_id="negative")
        with gr.Column(scale=1, min_width=130):
            go = gr.Button("Generate", variant="primary", elem_id="generate")
            stop = gr.Button("Interrupt", variant="stop", elem_id="interrupt")
    # The progress bar (step, time left) and errors show here, so the gallery keeps the last images.
    status = gr.Textbox(show_label=False, interactive=False, container=False, elem_id="gen-status",
                        placeholder="Step progress appears here while generating.")
    gallery = gr.Gallery(label="Images (click one for its parameters)", format="png", columns=4, height=300,
                         elem_id="gallery", object_fit="contain")
    info = gr.Textbox(label="Parameters", lines=2, max_lines=8, interactive=False, elem_id="parameters")
    with gr.Row():
        steps = gr.Slider(1, limits.steps, value=min(d.steps, limits.steps), step=1, label="Steps", elem_id="steps")
        guidance = gr.Slider(0, 30, value=d.guidance, step=0.5, label="Guidance (CFG)", elem_id="guidance")
        scheduler = gr.Dropdown(list(SCHEDULERS), value="model default", label="Scheduler", elem_id="scheduler")
    with gr.Row():
        width = gr.Slider(16, limits.side, value=d.width, step=8, label="Width", elem_id="width")
        height = gr.Slider(16, limits.side, value=d.height, step=8, label="Height", elem_id="height")
        batch = gr.Slider(1, limits.images, value=1, step=1, label="Batch size", elem_id="batch")
    with gr.Row():
        seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
        randomize = gr.Checkbox(value=False, label="Random seed", elem_id="randomize")
        merge = gr.Checkbox(value=False, label="Merge for speed (folds the blend into the weights)",
                            elem_id="merge")
    gr.Markdown(limits.text(), elem_id="limits")
    with gr.Accordion("PNG info: read a PNG's parameters and reuse them", open=False, elem_id="png-info"):
        png = gr.File(label="Drop a PNG made by imglora or A1111", file_types=[".png"], type="filepath",
                      elem_id="png-drop", height=120)
        png_text = gr.Textbox(label="Its parameters (or paste parameters text here)", lines=4, max_lines=12,
                              elem_id="png-parameters")
        send = gr.Button("Send to Generate", elem_id="send-to-generate")
        png_note = gr.Textbox(show_label=False, interactive=False, container=False, elem_id="png-note")
    seed_used = gr.Number(label="Seed used", precision=0, interactive=False, visible=False)
    texts = gr.State([])  # the parameters of every image in the gallery, for its select event

    inputs = [blend, prompt, negative, steps, guidance, seed, randomize, width, height, scheduler, batch, merge]
    go.click(on_pipeline(partial(_generate_for_page, session)), inputs, [gallery, seed_used, info, texts],
             api_name="generate", show_progress_on=[status], **PIPELINE)
    def interrupt(request: gr.Request):  # not a partial: Gradio finds the request by the annotation
        if not session.turns.interrupt(user_of(request)):
            warn("nothing of yours is running or waiting")
    stop.click(interrupt, None, None, api_name="interrupt", concurrency_limit=None)
    gallery.select(show_selected, texts, info, api_visibility="private")
    png.upload(in_page(read_png), png, png_text, api_name="png_info")

    fields = {"prompt": prompt, "negative": negative, "steps": steps, "guidance": guidance, "seed": seed,
              "width": width, "height": height, "scheduler": scheduler}

    def send_for_page(user_blend, text):
        settings, new, message = send_to_generate(session, user_blend, text)
        values = [settings.get(k, gr.skip()) for k in fields]
        return *values, False, new, list(new), summary(active_weights(session.catalogue, new)), message
    send.click(in_page(send_for_page), [blend, png_text],
               [*fields.values(), randomize, blend, panel["enabled"], panel["current"], png_note],
               api_visibility="private")
    return {**fields, "status": status}

"""Compare tab: one adapter's weight swept over N values, or two adapters on X and Y.

Every cell is rendered in ONE batched forward pass with its own blend (GenerateArgs.blends: per-sample
adapter weights, ANCHORS.md §3.4) and the same seed, so cells differ only by the blend.
"""

from __future__ import annotations

from functools import partial

import gradio as gr

from imglora.errors import ImgloraError
from imglora.generate import GenerateArgs, generate, image_grid, parameters_text
from imglora.lora.state import Blend

from ..blend import WEIGHT_LIMIT, active_weights, parse_prompt, pins
from ..catalogue import check_name
from ..messages import on_pipeline
from ..session import Job, Session
from .generate import PIPELINE, check_images, check_settings


def parse_values(text: str, what: str) -> list[float]:
    """'0, 0.5, 1' -> [0.0, 0.5, 1.0]."""
    try:
        values = [float(v) for v in str(text).replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise ImgloraError(f"{what} values {text!r} are not a list of numbers", "write them like 0, 0.5, 1") from None
    if not values:
        raise ImgloraError(f"no {what} values", "write them like 0, 0.5, 1")
    if any(abs(v) > WEIGHT_LIMIT for v in values):
        raise ImgloraError(f"{what} values must lie between -{WEIGHT_LIMIT:g} and {WEIGHT_LIMIT:g}", "")
    return values


def grid_blends(base: Blend, x_name: str, xs: list[float], y_name: str | None, ys: list[float]) -> list[dict]:
    """One {name: weight} row per cell, row-major (Y outer, X inner), over the user's own blend."""
    rows = []
    for y in ys if y_name else [None]:
        for x in xs:
            row = dict(base.weights)
            row[x_name] = x
            if y_name:
                row[y_name] = y
            rows.append(row)
    return rows


def run_grid(session: Session, blend: dict | None, prompt: str, negative: str = "", steps=20, guidance=7.5, seed=0,
             width=512, height=512, scheduler: str = "model default", x_name: str = "", x_values: str = "0, 0.5, 1",
             y_name: str | None = "", y_values: str = "", job: Job | None = None):
    """Returns (grid PNG path, cells [(image, label)], notes)."""
    steps, guidance, width, height, seed = check_settings(steps, guidance, width, height, seed, session.limits)
    if not x_name:
        raise ImgloraError("no X adapter chosen", "choose the adapter whose weight the grid sweeps")
    x_name = check_name(x_name)
    y_name = check_name(y_name) if y_name else None
    if y_name == x_name:
        raise ImgloraError("X and Y are the same adapter", "choose two different adapters, or leave Y empty")
    xs = parse_values(x_values, "X")
    ys = parse_values(y_values, "Y") if y_name else []
    if len(xs) * max(1, len(ys)) > session.max_grid:
        raise ImgloraError(f"{len(xs) * max(1, len(ys))} cells is more than {session.max_grid}",
                           "use fewer values (every cell is one image of the batch)")
    check_images(len(xs) * max(1, len(ys)), width, height, session.limits, what="cells")
    text, prompt_loras = parse_prompt(prompt)
    base = active_weights(session.catalogue, blend, prompt_loras)
    swept = Blend({**{n: 0.0 for n in (x_name, y_name) if n}, **base.weights}, base.te_weights)
    rows = grid_blends(base, x_name, xs, y_name, ys)
    args = GenerateArgs(text, negative or "", seed, steps, guidance, width, height, blends=rows)
    job = job or Job()
    job.steps = steps
    with session.using(swept, scheduler=scheduler, sample_rows=True, pins=pins(blend), job=job) as model:
        images = generate(model, args, session.adapters)
        params = parameters_text(model, args, seed, blend=base)
    labels = [f"{x_name} {r[x_name]:g}" for r in rows]
    row_labels = [f"{y_name} {y:g}" for y in ys] if y_name else None
    grid = image_grid(images, len(xs), labels, row_labels)
    axes = f"X: {x_name} {', '.join(f'{v:g}' for v in xs)}" + (f"; Y: {y_name} {', '.join(f'{v:g}' for v in ys)}"
                                                                 if y_name else "")
    path = session.save_image(grid, f"{params}\nGrid: {axes}", prefix="grid")
    notes = f"{len(images)} images in one batch, seed {seed}. {axes}."
    if base.te_weights:
        notes += " In a grid the text-encoder weight follows the UNet weight."
    cells = [(img, f"{lab}" + (f", {row_labels[i // len(xs)]}" if row_labels else ""))
             for i, (img, lab) in enumerate(zip(images, labels))]
    return str(path), cells, notes


def _grid_for_page(session: Session, *inputs, job: Job):
    path, cells, notes = run_grid(session, *inputs, job=job)
    return session.shown(path), cells, notes


def create_ui(session: Session, blend: gr.State, gen: dict):
    gr.Markdown("The current blend is the base of every cell; the chosen adapters' weights are swept. "
                "All cells use the prompt, settings and seed of the Generate tab.")
    with gr.Row():
        x_name = gr.Dropdown(session.catalogue.names(), label="X adapter", elem_id="grid-x", allow_custom_value=True)
        x_values = gr.Textbox("0, 0.5, 1", label="X weights", elem_id="grid-x-values")
    with gr.Row():
        y_name = gr.Dropdown([""] + session.catalogue.names(), value="", label="Y adapter (optional)", elem_id="grid-y",
                             allow_custom_value=True)
        y_values = gr.Textbox("", label="Y weights", elem_id="grid-y-values")
    go = gr.Button("Render grid", variant="primary", elem_id="render-grid")
    grid = gr.Image(label="Grid", type="filepath", format="png", elem_id="grid-image")
    notes = gr.Textbox(show_label=False, interactive=False, container=False, elem_id="grid-notes")
    cells = gr.Gallery(label="Cells", format="png", columns=6, elem_id="grid-cells")
    inputs = [blend, gen["prompt"], gen["negative"], gen["steps"], gen["guidance"], gen["seed"], gen["width"],
              gen["height"], gen["scheduler"], x_name, x_values, y_name, y_values]
    go.click(on_pipeline(partial(_grid_for_page, session)), inputs, [grid, cells, notes], api_name="grid",
             show_progress_on=[notes], **PIPELINE)
    return {"x_name": x_name, "y_name": y_name}

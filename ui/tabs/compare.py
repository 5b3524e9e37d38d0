"""Compare tab: one adapter's weight, block weights or step schedule swept over N values, or two axes on X and Y.

Every cell is rendered in ONE batched forward pass with its own blend (GenerateArgs.blends: per-sample
adapter weights, block weights and schedules, ANCHORS.md §3.4) and the same seed, so cells differ only by
the blend.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import gradio as gr

from imglora.errors import ImgloraError
from imglora.generate import GenerateArgs, generate, image_grid, parameters_text
from imglora.lora.blocks import block_weights
from imglora.lora.state import Blend

from ..blend import WEIGHT_LIMIT, active_weights, check_blocks, check_schedule, parse_prompt, parse_schedule, pins
from ..catalogue import check_name
from ..messages import on_pipeline
from ..session import Job, Session
from .generate import PIPELINE, check_images, check_settings

# What an axis sweeps: label -> (the values box's label, its example values).
AXES = {"weight": ("weights", "0, 0.5, 1"), "blocks": ("block weights (presets, or ';' between lists)",
                                                       "NONE, ALL, IND, OUTD"),
        "steps": ("schedules (';' between keyframe lists)", "stop=1, stop=2, start=2")}


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


def axis_values(kind: str, text: str, what: str) -> list:
    """An axis's values: weights (floats), block weights (specs) or schedules (their text), checked.
    Block lists and keyframes hold commas, so ';' separates values when there is one."""
    if kind == "weight":
        return parse_values(text, what)
    if kind not in AXES:
        raise ImgloraError(f"unknown {what} axis {kind!r}", f"choose one of {', '.join(AXES)}")
    text = str(text or "")
    items = [v.strip() for v in text.split(";" if ";" in text else ",") if v.strip()]
    if not items:
        raise ImgloraError(f"no {what} values", f"write them like {AXES[kind][1]}")
    check = check_blocks if kind == "blocks" else check_schedule
    values = [check(v) for v in items]
    return ["off" if v is None else v for v in values] if kind == "blocks" else [v or "" for v in values]


def cell(base: Blend, name: str, kind: str, value) -> Blend:
    """The base blend with one adapter's weight, block weights or schedule set (a swept weight sets its text
    encoder too; an adapter the blend lacks comes in at weight 1 when its blocks or steps are swept)."""
    weights, te = dict(base.weights), dict(base.te_weights)
    blocks, schedules = dict(base.blocks), dict(base.schedules)
    weights.setdefault(name, 1.0)
    if kind == "weight":
        weights[name] = value
        te.pop(name, None)
    elif kind == "blocks":
        blocks.pop(name, None)
        if value != "off":
            blocks[name] = block_weights(value)
    else:
        schedules.pop(name, None)
        schedule = parse_schedule(value)
        if schedule:
            schedules[name] = schedule
        if schedule.keys:  # keyframes are the UNet weight itself
            weights[name] = schedule.keys[0][0]
    return dataclasses.replace(base, weights=weights, te_weights=te, blocks=blocks, schedules=schedules)


def grid_blends(base: Blend, x: tuple, xs: list, y: tuple | None, ys: list) -> list[Blend]:
    """One Blend per cell, row-major (Y outer, X inner), over the user's own blend; x and y are
    (adapter name, axis kind)."""
    rows = []
    for yv in ys if y else [None]:
        for xv in xs:
            row = cell(base, *x, xv)
            rows.append(cell(row, *y, yv) if y else row)
    return rows


def _label(name: str, kind: str, value) -> str:
    if kind == "weight":
        return f"{name} {value:g}"
    return f"{name} {value or 'no schedule'}"


def run_grid(session: Session, blend: dict | None, prompt: str, negative: str = "", steps=20, guidance=7.5, seed=0,
             width=512, height=512, scheduler: str = "model default", x_name: str = "", x_values: str = "0, 0.5, 1",
             y_name: str | None = "", y_values: str = "", x_kind: str = "weight", y_kind: str = "weight",
             job: Job | None = None):
    """Returns (grid PNG path, cells [(image, label)], notes). x_kind/y_kind: what each axis sweeps (AXES)."""
    steps, guidance, width, height, seed = check_settings(steps, guidance, width, height, seed, session.limits)
    if not x_name:
        raise ImgloraError("no X adapter chosen", "choose the adapter whose weight the grid sweeps")
    x_name = check_name(x_name)
    y_name = check_name(y_name) if y_name else None
    x_kind, y_kind = x_kind or "weight", y_kind or "weight"
    if y_name == x_name and y_kind == x_kind:
        raise ImgloraError("X and Y sweep the same thing", "choose two different adapters or axes, or leave Y empty")
    xs = axis_values(x_kind, x_values, "X")
    ys = axis_values(y_kind, y_values, "Y") if y_name else []
    if len(xs) * max(1, len(ys)) > session.max_grid:
        raise ImgloraError(f"{len(xs) * max(1, len(ys))} cells is more than {session.max_grid}",
                           "use fewer values (every cell is one image of the batch)")
    check_images(len(xs) * max(1, len(ys)), width, height, session.limits, what="cells")
    text, prompt_loras = parse_prompt(prompt)
    base = active_weights(session.catalogue, blend, prompt_loras)
    rows = grid_blends(base, (x_name, x_kind), xs, (y_name, y_kind) if y_name else None, ys)
    swept = Blend({**{n: 0.0 for n in (x_name, y_name) if n}, **base.weights}, base.te_weights)  # all loaded
    args = GenerateArgs(text, negative or "", seed, steps, guidance, width, height, blends=rows)
    job = job or Job()
    job.steps = steps
    with session.using(swept, scheduler=scheduler, sample_rows=True, pins=pins(blend), job=job) as model:
        images = generate(model, args, session.adapters)
        params = parameters_text(model, args, seed, blend=base)
    labels = [_label(x_name, x_kind, v) for v in xs] * max(1, len(ys))
    row_labels = [_label(y_name, y_kind, v) for v in ys] if y_name else None
    grid = image_grid(images, len(xs), labels, row_labels)

    def axis(name, kind, values):
        shown = ", ".join(f"{v:g}" if kind == "weight" else (v or "no schedule") for v in values)
        return f"{name} {'' if kind == 'weight' else kind + ' '}{shown}"
    axes = f"X: {axis(x_name, x_kind, xs)}" + (f"; Y: {axis(y_name, y_kind, ys)}" if y_name else "")
    path = session.save_image(grid, f"{params}\nGrid: {axes}", prefix="grid")
    notes = f"{len(images)} images in one batch, seed {seed}. {axes}."
    if any(n in base.te_weights for n, k in ((x_name, x_kind), (y_name, y_kind)) if k == "weight"):
        notes += " A swept weight sets the text encoder's too."
    cells = [(img, f"{lab}" + (f", {row_labels[i // len(xs)]}" if row_labels else ""))
             for i, (img, lab) in enumerate(zip(images, labels))]
    return str(path), cells, notes


def _grid_for_page(session: Session, *inputs, job: Job):
    path, cells, notes = run_grid(session, *inputs, job=job)
    return session.shown(path), cells, notes


def create_ui(session: Session, blend: gr.State, gen: dict):
    gr.Markdown("The current blend is the base of every cell; the chosen adapters' weights, block weights or step "
                "schedules are swept. All cells use the prompt, settings and seed of the Generate tab.")
    boxes = {}
    for axis, default in (("x", "0, 0.5, 1"), ("y", "")):
        with gr.Row():
            if axis == "x":
                name = gr.Dropdown(session.catalogue.names(), label="X adapter", elem_id="grid-x",
                                   allow_custom_value=True, scale=2)
            else:
                name = gr.Dropdown([""] + session.catalogue.names(), value="", label="Y adapter (optional)",
                                   elem_id="grid-y", allow_custom_value=True, scale=2)
            kind = gr.Dropdown(list(AXES), value="weight", label="sweeps", elem_id=f"grid-{axis}-kind", scale=1,
                               min_width=100)
            values = gr.Textbox(default, label=f"{axis.upper()} weights", elem_id=f"grid-{axis}-values", scale=3)
        # A new kind shows its own example values, so the box never holds values of another kind.
        kind.input(lambda k, axis=axis: gr.update(label=f"{axis.upper()} {AXES[k][0]}", value=AXES[k][1]), kind,
                   values, api_visibility="private")
        boxes[axis] = (name, kind, values)
    go = gr.Button("Render grid", variant="primary", elem_id="render-grid")
    grid = gr.Image(label="Grid", type="filepath", format="png", elem_id="grid-image")
    notes = gr.Textbox(show_label=False, interactive=False, container=False, elem_id="grid-notes")
    cells = gr.Gallery(label="Cells", format="png", columns=6, elem_id="grid-cells")
    (x_name, x_kind, x_values), (y_name, y_kind, y_values) = boxes["x"], boxes["y"]
    inputs = [blend, gen["prompt"], gen["negative"], gen["steps"], gen["guidance"], gen["seed"], gen["width"],
              gen["height"], gen["scheduler"], x_name, x_values, y_name, y_values, x_kind, y_kind]
    go.click(on_pipeline(partial(_grid_for_page, session)), inputs, [grid, cells, notes], api_name="grid",
             show_progress_on=[notes], **PIPELINE)
    return {"x_name": x_name, "y_name": y_name}

"""Export tab: the current blend as one adapter file, or baked into the base model as a diffusers folder."""

from __future__ import annotations

from functools import partial

import gradio as gr

from imglora.errors import ImgloraError
from imglora.formats.lora_file import load_adapter, save_adapter
from imglora.formats.metadata import build_metadata
from imglora.lora.blocks import spec_of
from imglora.ops.bake import save_baked
from imglora.ops.merge import blend_parts, merge

from ..blend import active_weights, pins, schedule_text
from ..catalogue import check_name
from ..messages import in_page, on_pipeline
from ..session import Job, Session
from .generate import PIPELINE


def _named_blend(session: Session, blend: dict | None, name: str) -> tuple[str, dict]:
    name = check_name(name)
    weights = active_weights(session.catalogue, blend)
    if not weights:
        raise ImgloraError("the blend is empty", "enable at least one adapter first")
    timed = [f"{n} ({schedule_text(s)})" for n, s in weights.schedules.items() if s]
    if timed:  # no single file or model can hold weights that change between steps
        raise ImgloraError(f"{', '.join(timed)}: a step schedule cannot be exported or baked",
                           "clear its steps field to save the blend without it; schedules work at generation")
    return name, weights


def export_adapter(session: Session, blend: dict | None, name: str, method: str = "exact", rank=None,
                   fmt: str = "kohya") -> str:
    """Save the blend as `<adapters folder>/<name>.safetensors`: exact concatenation or SVD to `rank`."""
    name, weights = _named_blend(session, blend, name)
    if fmt not in ("kohya", "diffusers"):
        raise ImgloraError(f"unknown format {fmt!r}", "choose kohya or diffusers")
    target = session.catalogue.folder / f"{name}.safetensors"
    if target.exists():
        raise ImgloraError("already exists", "choose another name", path=target.name)
    if method not in ("exact", "svd"):
        raise ImgloraError(f"unknown method {method!r}", "choose exact or svd")
    svd_rank = None
    if method == "svd":
        svd_rank = int(rank or 0)
        if not 1 <= svd_rank <= 1024:
            raise ImgloraError(f"rank {rank} is out of range", "use a rank from 1 to 1024")
    lpb = session.model.layers_per_block
    parts, sources = [], []
    for n, (w, te) in weights.pairs().items():
        entry = session.catalogue.get(n)
        adapter, _ = load_adapter(entry.path, lpb)
        parts += blend_parts(adapter, weights, n, lpb)  # grouped by the weight each module gets, blocks included
        sources.append({"name": n, "file": entry.path.name, "weight": w, "te_weight": w if te is None else te,
                        **({"blocks": spec_of(weights.blocks[n])} if n in weights.blocks else {})})
    try:
        merged, energy = merge(parts, svd_rank)
    except ValueError as e:
        raise ImgloraError(str(e), "blend adapters made for the same base model") from None
    merged.arch = session.arch if merged.arch == "unknown" else merged.arch
    meta = build_metadata(merged, merged.arch, name, extra={
        "modelspec.merged_from": ", ".join(s["file"] for s in sources),
        "imglora.merged_from": sources,
        "imglora.merge_method": "exact concatenation" if svd_rank is None else f"svd rank {svd_rank}"})
    save_adapter(target, merged, fmt=fmt, metadata=meta, layers_per_block=lpb)
    session.catalogue.scan()
    ranks = "/".join(str(r) for r in sorted(merged.ranks()))
    how = "exact concatenation" if energy is None else energy.line()
    return f"Saved {target.name} to the adapters folder: {len(merged.modules)} modules, rank {ranks}, {how}."


def bake_model(session: Session, blend: dict | None, name: str, job: Job | None = None) -> str:
    """Fold the blend into the base weights and save the pipeline as `<outputs>/models/<name>` (diffusers)."""
    name, weights = _named_blend(session, blend, name)
    target = session.outputs / "models" / name
    if target.exists():
        raise ImgloraError("already exists", "choose another name", path=target)
    with session.using(weights, merge=True, pins=pins(blend), job=job):
        try:
            save_baked(session.model, session.adapters, target)
        finally:
            session.unmerge()  # the exact base weights again; the adapters stay loaded
    return f"Saved the base model with the blend baked in to {target} (a diffusers folder)."


def create_ui(session: Session, blend: gr.State, catalogue_changed):
    gr.Markdown("Save the **current blend** (enabled adapters at their weights and block weights) as one adapter file "
                "in the adapters folder, or bake it into the base model. A step schedule works only at generation.")
    with gr.Row():
        name = gr.Textbox(label="Adapter name", placeholder="my_blend", elem_id="export-name")
        method = gr.Radio(["exact", "svd"], value="exact", label="Method (exact concatenation, or SVD to a rank)",
                          elem_id="export-method")
        rank = gr.Number(value=16, precision=0, label="SVD rank", elem_id="export-rank")
        fmt = gr.Radio(["kohya", "diffusers"], value="kohya", label="Format", elem_id="export-format")
    save = gr.Button("Save blend as adapter", elem_id="export-save")
    with gr.Row():
        model_name = gr.Textbox(label="Model folder name", placeholder="my_model", elem_id="bake-name")
        bake = gr.Button("Bake blend into the base model", elem_id="bake")
    status = gr.Textbox(show_label=False, interactive=False, container=False, elem_id="export-status")
    save.click(in_page(partial(export_adapter, session)), [blend, name, method, rank, fmt], status,
               api_name="export_adapter").then(**catalogue_changed)
    bake.click(on_pipeline(partial(bake_model, session)), [blend, model_name], status, api_name="bake",
               **PIPELINE)

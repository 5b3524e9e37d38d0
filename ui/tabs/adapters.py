"""The adapters panel: the folder's list (with reasons for unusable files), upload, and per-adapter
enable boxes, weight sliders and cards that edit the user's blend."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from functools import partial
from pathlib import Path

import gradio as gr

from imglora.errors import ImgloraError
from imglora.formats.files import TMP_MARK
from imglora.formats.detect import ARCH_NAMES, check_arch
from imglora.formats.lora_file import load_adapter
from imglora.pipeline import adapter_name

from imglora.lora.state import Blend

from ..blend import WEIGHT_LIMIT, active_weights, prune, set_adapter, summary
from ..catalogue import SUFFIX, Catalogue
from ..messages import in_page
from ..session import Session

HEADERS = ["name", "status", "base model", "file"]


def listing(session: Session) -> list[list[str]]:
    """Rescan the folder; one row per .safetensors file."""
    return [e.row() for e in session.catalogue.scan()]


def _listing_twice(session: Session):
    rows = listing(session)
    return rows, rows


def card_markdown(catalogue: Catalogue, name: str) -> str:
    """Base model, rank, alpha, targets, trigger words and top tags (the full, strict read of the file)."""
    info = catalogue.card(name)
    meta = info["metadata"]
    lines = [f"**{name}** · {ARCH_NAMES.get(info['base_model'], info['base_model'])} · {info['format']} · "
             f"{info['modules']} modules ({info['parameters']:,} parameters)",
             f"- rank: {', '.join(map(str, info['rank']))}; alpha: {', '.join(f'{a:g}' for a in info['alpha'])}"]
    for component, kinds in info["targets"].items():
        lines.append(f"- {component}: " + ", ".join(f"{k} ×{n}" for k, n in kinds.items()))
    trigger = meta.get("modelspec.trigger_phrase") or meta.get("ss_trigger_words")
    if trigger:
        lines.append(f"- trigger words: `{_plain(str(trigger))}`")
    tags = Counter()
    freq = meta.get("ss_tag_frequency")
    if isinstance(freq, dict):
        for per_dir in freq.values():
            if isinstance(per_dir, dict):
                tags.update({str(k): v for k, v in per_dir.items() if isinstance(v, (int, float))})
    if tags:
        lines.append("- top tags: " + ", ".join(f"{_plain(t)} ({n:g})" for t, n in tags.most_common(12)))
    lines += [f"- warning: {_plain(w)}" for w in info["warnings"]]
    return "\n".join(lines)


def _plain(text: str) -> str:
    """Metadata is someone else's text: shown as text, not as Markdown or HTML."""
    return text.replace("`", "'").replace("<", "&lt;").replace(">", "&gt;")[:300]


def upload_adapter(session: Session, file) -> str:
    """Validate an uploaded file in a temp file inside the folder, then link it in under a fresh name.

    A bad file is a message and leaves nothing in the folder (RELIABILITY.md U3).
    """
    if not session.uploads_enabled:
        raise ImgloraError("uploads are disabled on this server",
                           "the app listens beyond this machine without --auth; copy files into the folder instead")
    if not file:
        raise ImgloraError("no file was uploaded", "choose a .safetensors file")
    src = Path(file if isinstance(file, (str, os.PathLike)) else file.name)
    original = src.name
    if not original.endswith(SUFFIX):
        raise ImgloraError("only .safetensors adapters are accepted", "convert it first; pickles can run code",
                           path=original)
    size = src.stat().st_size
    if size > session.max_upload_bytes:
        raise ImgloraError(f"too large ({size / 2**20:.1f} MB, the limit is {session.max_upload_bytes / 2**20:.0f} MB)",
                           "raise --max-upload-mb, or copy the file into the adapters folder", path=original)
    folder = session.catalogue.folder
    fd, tmp = tempfile.mkstemp(prefix=f".upload{TMP_MARK}", suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
            shutil.copyfileobj(f, out)
        try:
            adapter, _ = load_adapter(tmp, session.model.layers_per_block)  # the strict reader, F1-F5
        except ImgloraError as e:
            raise ImgloraError(e.what, e.fix, path=original) from None
        check_arch(adapter.arch, session.arch, original)
        name = adapter_name(original, session.catalogue.names(usable_only=False))
        target = folder / f"{name}{SUFFIX}"
        try:
            os.link(tmp, target)  # never replaces a file already there
        except FileExistsError:
            raise ImgloraError("a file of that name is already in the adapters folder", "rename it and upload again",
                               path=target.name) from None
        os.chmod(target, 0o644)
    finally:
        os.unlink(tmp)
    session.catalogue.scan()
    return f"Added {target.name} as adapter {name!r}."


def _pruned(session: Session, blend):
    new = prune(session.catalogue, blend)
    return new, summary(active_weights(session.catalogue, new))


def api_set_adapter(session: Session, blend, name, on, weight, te_weight):
    new = set_adapter(session.catalogue, blend, name, on, weight, te_weight)
    return new, summary(active_weights(session.catalogue, new))


def create_ui(session: Session, blend: gr.State, demo: gr.Blocks):
    """The panel; returns the listing state and the `.then` kwargs other tabs use after changing the folder."""
    rows = gr.State(listing(session))
    with gr.Row():
        refresh = gr.Button("Refresh", elem_id="refresh", scale=0)
        current = gr.Textbox(summary(Blend()), label="Current blend", interactive=False, elem_id="blend-summary", scale=4)
    table = gr.Dataframe(value=rows.value, headers=HEADERS, interactive=False, label="Adapters folder",
                         elem_id="adapters-table", wrap=True)
    separate_te = gr.Checkbox(False, label="Separate text-encoder weights", elem_id="separate-te")

    @gr.render(inputs=[rows, blend, separate_te], triggers=[demo.load, rows.change, separate_te.change])
    def adapter_rows(listed, user_blend, separate):
        for name, status, *_ in listed:
            if status != "ok":
                continue
            mine = (user_blend or {}).get(name, {})
            with gr.Row(elem_classes=["adapter-row"]):
                on = gr.Checkbox(mine.get("on", False), label=name, key=f"on-{name}", elem_id=f"on-{name}", scale=1,
                                 interactive=True)
                w = gr.Slider(-2, 2, value=mine.get("weight", 1.0), step=0.05, label=f"{name} weight",
                              key=f"w-{name}", elem_id=f"w-{name}", scale=3, interactive=True)
                te = gr.Slider(-2, 2, value=mine.get("te") if mine.get("te") is not None else mine.get("weight", 1.0),
                               step=0.05, label=f"{name} text-encoder weight", key=f"te-{name}",
                               elem_id=f"te-{name}", visible=bool(separate), scale=3, interactive=True)
            with gr.Accordion(f"{name} card", open=False, key=f"card-{name}") as acc:
                card = gr.Markdown(key=f"card-md-{name}")
            acc.expand(in_page(partial(card_markdown, session.catalogue, name)), None, card, api_visibility="private")

            def on_change(b, on_, w_, te_, sep, name=name):
                return api_set_adapter(session, b, name, on_, w_, te_ if sep else None)
            for comp in (on, w, te):
                comp.change(in_page(on_change), [blend, on, w, te, separate_te], [blend, current],
                            api_visibility="private", trigger_mode="always_last")

    # Every change of the folder lists it again: the table, and (through rows) the per-adapter controls.
    changed = {"fn": partial(_listing_twice, session), "inputs": None, "outputs": [rows, table],
               "api_visibility": "private"}

    # Named API endpoints for clients (gradio_client): the same functions the sliders call.
    with gr.Row(visible=False):
        api_name_box = gr.Textbox()
        api_on = gr.Checkbox()
        api_weight = gr.Number(minimum=-WEIGHT_LIMIT, maximum=WEIGHT_LIMIT)
        api_te = gr.Number()
        api_set = gr.Button()
        api_card = gr.Button()
        api_card_out = gr.Markdown()
    api_set.click(in_page(partial(api_set_adapter, session)), [blend, api_name_box, api_on, api_weight, api_te],
                  [blend, current], api_name="set_adapter")
    api_card.click(in_page(partial(card_markdown, session.catalogue)), api_name_box, api_card_out, api_name="card")

    with gr.Accordion("Upload an adapter", open=False):
        if session.uploads_enabled:
            upload = gr.File(label=f"A .safetensors adapter (at most {session.max_upload_bytes // 2**20} MB)",
                             file_types=[SUFFIX], elem_id="upload")
            upload_status = gr.Markdown(elem_id="upload-status")
            upload.upload(in_page(partial(upload_adapter, session)), upload, upload_status, api_name="upload").then(
                **changed)
        else:
            gr.Markdown("Uploads are disabled: the app listens beyond this machine without a login (--auth).")

    refresh.click(partial(_listing_twice, session), None, [rows, table], api_name="refresh")
    rows.change(partial(_pruned, session), blend, [blend, current], api_visibility="private")
    return rows, changed

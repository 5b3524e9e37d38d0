"""The adapters panel, built for a library of dozens: the enabled adapters first, each with its weight
slider(s) and card; then a search box over names, trigger words and tags, and the other usable adapters
as compact tick boxes; then every unusable file with its whole reason. Everything read from a file is
shown as plain text (Textbox, labels), never as Markdown or HTML."""

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
from ..messages import in_page, warn
from ..session import Session

HEADERS = ["name", "status", "base model", "file", "keywords"]


def listing(session: Session) -> list[list[str]]:
    """Rescan the folder; one row per .safetensors file."""
    return [e.row() for e in session.catalogue.scan()]


def _listing_twice(session: Session):
    rows = listing(session)
    return rows, {"headers": HEADERS, "data": rows}


def card_text(catalogue: Catalogue, name: str) -> str:
    """File, base model, rank, alpha, targets, trigger words and top tags (the full, strict read of the file).
    Plain text: the metadata is someone else's, and is shown as written."""
    info = catalogue.card(name)
    meta = info["metadata"]
    lines = [f"{name} · {ARCH_NAMES.get(info['base_model'], info['base_model'])} · {info['format']} · "
             f"{info['modules']} modules ({info['parameters']:,} parameters)",
             f"- file: {catalogue.get(name).path.name}",
             f"- rank: {', '.join(map(str, info['rank']))}; alpha: {', '.join(f'{a:g}' for a in info['alpha'])}"]
    for component, kinds in info["targets"].items():
        lines.append(f"- {component}: " + ", ".join(f"{k} ×{n}" for k, n in kinds.items()))
    trigger = meta.get("modelspec.trigger_phrase") or meta.get("ss_trigger_words")
    if trigger:
        lines.append(f"- trigger words: {_short(str(trigger))}")
    tags = Counter()
    freq = meta.get("ss_tag_frequency")
    if isinstance(freq, dict):
        for per_dir in freq.values():
            if isinstance(per_dir, dict):
                tags.update({str(k): v for k, v in per_dir.items() if isinstance(v, (int, float))})
    if tags:
        lines.append("- top tags: " + ", ".join(f"{_short(t)} ({n:g})" for t, n in tags.most_common(12)))
    lines += [f"- warning: {_short(w)}" for w in info["warnings"]]
    return "\n".join(lines)


def _short(text: str) -> str:
    return text if len(text) <= 300 else text[:299] + "…"


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
    """After a listing: drop what is gone, broken or now another file, and say so."""
    new, dropped = prune(session.catalogue, blend)
    if dropped:
        warn(f"taken out of your blend: {', '.join(dropped)} (removed, broken, or the name now means another file; "
             "enable it again to use what is in the folder now)")
    return new, summary(active_weights(session.catalogue, new)), list(new)


def api_set_adapter(session: Session, blend, name, on, weight, te_weight, keep_file: bool = False):
    new = set_adapter(session.catalogue, blend, name, on, weight, te_weight, keep_file=keep_file)
    return new, summary(active_weights(session.catalogue, new))


def enable(session: Session, blend, picked):
    """Tick boxes of the library -> those adapters on, at weight 1, at the top of the panel."""
    new = dict(blend or {})
    for name in picked or []:
        if name not in new:
            new = set_adapter(session.catalogue, new, name, True, 1.0)
    return new, summary(active_weights(session.catalogue, new)), list(new)


def library(rows, blend, query):
    """The library tick boxes (usable, not enabled, matching the search) and the unusable files with reasons."""
    q = (query or "").strip().lower()
    hit = [r for r in rows if not q or q in r[0].lower() or q in r[4]]
    on = set(blend or {})
    usable = [r[0] for r in rows if r[1] == "ok"]
    choices = [r[0] for r in hit if r[1] == "ok" and r[0] not in on]
    bad = [f"• {r[3]}: {r[1]}" for r in hit if r[1] != "ok"]
    label = (f"Adapters: {len(choices)} of {len(usable) - len(on & set(usable))} match {query.strip()!r}" if q else
             f"Adapters: {len(choices)} more usable") + " (tick to enable)"
    unusable = gr.update(value="\n".join(bad), label=f"Cannot be used ({len(bad)})", visible=bool(bad))
    return gr.update(choices=choices, value=[], label=label), unusable


def create_ui(session: Session, blend: gr.State, demo: gr.Blocks):
    """The panel; returns its components and the `.then` kwargs other tabs use after changing the folder."""
    rows = gr.State(listing(session))
    enabled = gr.State([])  # the blend's names, in the order enabled; changes only when one is turned on or off
    with gr.Row(equal_height=True):
        gr.Markdown("**imglora**: blend and compare LoRA adapters")
        refresh = gr.Button("Refresh the folder", elem_id="refresh", size="sm", scale=0, min_width=150)
    current = gr.Textbox(summary(Blend()), label="Current blend", interactive=False, elem_id="blend-summary")
    separate_te = gr.Checkbox(False, label="Separate text-encoder weights", elem_id="separate-te", scale=2,
                              container=False, render=False)  # shown beside the search box, below the sliders

    @gr.render(inputs=[enabled, blend, separate_te], triggers=[enabled.change, separate_te.change])
    def enabled_rows(names, user_blend, separate):
        for name in names:
            mine = (user_blend or {}).get(name)
            if not mine:
                continue
            with gr.Group(elem_classes=["adapter-row"], key=f"row-{name}"):
                with gr.Row(equal_height=True):
                    on = gr.Checkbox(True, label=name, key=f"on-{name}", elem_id=f"on-{name}", scale=2,
                                     min_width=120, interactive=True)
                    w = gr.Slider(-2, 2, value=mine["weight"], step=0.05, label="weight", key=f"w-{name}",
                                  elem_id=f"w-{name}", scale=3, interactive=True)
                    te = gr.Slider(-2, 2, value=mine["te"] if mine.get("te") is not None else mine["weight"],
                                   step=0.05, label="text encoder", key=f"te-{name}", elem_id=f"te-{name}",
                                   visible=bool(separate), scale=3, interactive=True)
                with gr.Accordion(f"{name} card", open=False, key=f"card-{name}") as acc:
                    card = gr.Textbox(show_label=False, interactive=False, lines=3, max_lines=20,
                                      key=f"card-text-{name}", elem_id=f"card-{name}")
            acc.expand(in_page(partial(card_text, session.catalogue, name)), None, card, api_visibility="private")

            def turn_off(b, name=name):
                new = set_adapter(session.catalogue, b, name, False, 0)
                return new, summary(active_weights(session.catalogue, new)), list(new)
            on.input(in_page(turn_off), blend, [blend, current, enabled], api_visibility="private")

            def weigh(b, w_, te_, sep, name=name):
                return api_set_adapter(session, b, name, True, w_, te_ if sep else None, keep_file=True)
            for comp in (w, te):
                comp.change(in_page(weigh), [blend, w, te, separate_te], [blend, current],
                            api_visibility="private", trigger_mode="always_last")

    with gr.Row():
        search = gr.Textbox(show_label=False, placeholder="Search: name, file, trigger word or tag", container=False,
                            elem_id="adapter-search", scale=3)
        separate_te.render()
    picks = gr.CheckboxGroup([], label="Adapters", elem_id="library")
    unusable = gr.Textbox(label="Cannot be used", interactive=False, lines=1, max_lines=40, elem_id="unusable",
                          visible=False)
    listing_json = gr.JSON(visible=False)

    # Every change of the folder lists it again: the library, the unusable files, and the blend is pruned.
    changed = {"fn": partial(_listing_twice, session), "inputs": None, "outputs": [rows, listing_json],
               "api_visibility": "private"}

    # Named API endpoints for clients (gradio_client): the same functions the page calls.
    with gr.Row(visible=False):
        api_name_box = gr.Textbox()
        api_on = gr.Checkbox()
        api_weight = gr.Number(minimum=-WEIGHT_LIMIT, maximum=WEIGHT_LIMIT)
        api_te = gr.Number()
        api_set = gr.Button()
        api_card = gr.Button()
        api_card_out = gr.Textbox()
    api_set.click(in_page(partial(api_set_adapter, session)), [blend, api_name_box, api_on, api_weight, api_te],
                  [blend, current], api_name="set_adapter")
    api_card.click(in_page(partial(card_text, session.catalogue)), api_name_box, api_card_out, api_name="card")

    with gr.Accordion("Upload an adapter", open=False):
        if session.uploads_enabled:
            upload = gr.File(label=f"A .safetensors adapter (at most {session.max_upload_bytes // 2**20} MB)",
                             file_types=[SUFFIX], elem_id="upload")
            upload_status = gr.Textbox(show_label=False, interactive=False, container=False, elem_id="upload-status")
            upload.upload(in_page(partial(upload_adapter, session)), upload, upload_status, api_name="upload").then(
                **changed)
        else:
            gr.Markdown("Uploads are disabled: the app listens beyond this machine without a login (--auth).")

    refresh.click(partial(_listing_twice, session), None, [rows, listing_json], api_name="refresh")
    demo.load(partial(_listing_twice, session), None, [rows, listing_json], api_visibility="private")
    rows.change(in_page(partial(_pruned, session)), blend, [blend, current, enabled], api_visibility="private")
    gr.on([rows.change, enabled.change, demo.load], library, [rows, blend, search], [picks, unusable],
          api_visibility="private")
    search.change(library, [rows, blend, search], [picks, unusable], api_visibility="private",
                 trigger_mode="always_last")
    picks.input(in_page(partial(enable, session)), [blend, picks], [blend, current, enabled],
                api_visibility="private")
    return {"rows": rows, "enabled": enabled, "current": current}, changed

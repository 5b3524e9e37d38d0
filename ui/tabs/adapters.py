"""The adapters panel, built for a library of dozens: the enabled adapters first, each with its weight
slider(s), block weights (a preset, or one number per block in a closed editor), step schedule and card;
then a search box over names, trigger words and tags, and the other usable adapters as compact tick boxes;
then every unusable file with its whole reason. Everything read from a file is shown as plain text
(Textbox, labels), never as Markdown or HTML. Under the blend's summary: where two enabled adapters'
updates overlap strongly (ops/interact.py), computed once per pair of files."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections import Counter
from functools import partial
from pathlib import Path

import gradio as gr
from torch import nn

from imglora.errors import ImgloraError
from imglora.formats.files import TMP_MARK
from imglora.formats.detect import ARCH_NAMES, check_arch
from imglora.formats.lora_file import load_adapter
from imglora.pipeline import adapter_name

from imglora.lora.blocks import BLOCKS26, PRESETS, block_of, block_weights, multiplier, spec_of
from imglora.lora.state import Blend
from imglora.ops.interact import OVERLAP, report

from ..blend import WEIGHT_LIMIT, active_weights, pins, preset_of, prune, set_adapter, set_options, summary
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


def model_blocks(session: Session) -> list[str]:
    """The LBW blocks this model has, in LBW's order: BASE (the text encoders) and every block its UNet's layers
    fall in. All 26 for SD 1.x/2.x, 20 for SDXL (three levels), fewer for the tiny embedded model."""
    lpb = session.model.layers_per_block
    found = {block_of(f"unet.{n}", lpb) for n, m in session.pipe.unet.named_modules()
             if isinstance(m, (nn.Linear, nn.Conv2d))}
    return [b for b in BLOCKS26 if b == "BASE" or b in found]


def block_values(spec: str | None) -> dict[str, float]:
    """{block: multiplier} of a stored spec (1 everywhere without block weights)."""
    return dict(zip(BLOCKS26, block_weights(spec) if spec else [1.0] * len(BLOCKS26)))


def blocks_from_editor(shown: list[str], values: list) -> str:
    """The editor's numbers -> a spec: blocks the model lacks are 0 (what LBW's lists give them, and the shortest
    list), and all ones is no block weights ("")."""
    given = dict(zip(shown, (float(v) for v in values)))
    if all(v == 1.0 for v in given.values()):
        return ""
    return spec_of(tuple(given.get(b, 0.0) for b in BLOCKS26))


def overlap_warnings(session: Session, blend, cache: dict) -> str:
    """One line per pair of enabled adapters whose updates overlap strongly (|cosine| >= OVERLAP) in some block,
    leaving out blocks where either is off (weight or block weight 0). The comparison reads both files once per
    pair of file versions (cache); kinds whose ΔW needs the base weights (DoRA, OFT, ...) are left out of it."""
    catalogue, pinned = session.catalogue, pins(blend)
    try:
        active = active_weights(catalogue, blend)
    except ImgloraError:
        return ""  # a blend that cannot run says so when it is used
    lines = []
    for a, b in itertools.combinations(active.weights, 2):
        ea, eb = sorted((catalogue.get(a, pinned.get(a)), catalogue.get(b, pinned.get(b))), key=lambda e: e.version)
        a, b = ea.name, eb.name  # in file order: the cosine is symmetric, so one entry serves both orders
        key = (ea.version, eb.version)
        if key not in cache:
            try:
                files = {"a": load_adapter(ea.path, session.model.layers_per_block)[0],
                         "b": load_adapter(eb.path, session.model.layers_per_block)[0]}
            except (ImgloraError, OSError, ValueError):
                files = None
            blocks = report(files, session.model.layers_per_block)["blocks"] if files else {}
            cache[key] = {block: r["cos"]["a|b"] for block, r in blocks.items() if "a|b" in r["cos"]}

        def on(name, block):
            w = active.te(name) if block == "BASE" else active.weights[name]
            return w * multiplier(active.blocks.get(name), None if block == "other" else block) != 0
        hit = [f"{block} {c:+.2f}" for block, c in cache[key].items()
               if abs(c) >= OVERLAP and on(a, block) and on(b, block)]
        if hit:
            lines.append(f"{a} and {b} overlap strongly (cosine) in {', '.join(hit)}: stacked, they push the same "
                         "directions; lower one of them there (block weights) or its weight")
    return "\n".join(lines)


def api_set_adapter(session: Session, blend, name, on, weight, te_weight, keep_file: bool = False):
    new = set_adapter(session.catalogue, blend, name, on, weight, te_weight, keep_file=keep_file)
    return new, summary(active_weights(session.catalogue, new))


def api_set_options(session: Session, blend, name, blocks, schedule):
    """An enabled adapter's block weights (a preset or numbers) and step schedule; None keeps, "" clears."""
    new = set_options(session.catalogue, blend, name, blocks=blocks, schedule=schedule)
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


# off: no block weights; custom: the numbers in the editor. Labelled in the list, so the row needs no label.
BLOCK_CHOICES = [(f"blocks: {c}", c) for c in ("off", *PRESETS, "custom")]


def create_ui(session: Session, blend: gr.State, demo: gr.Blocks):
    """The panel; returns its components and the `.then` kwargs other tabs use after changing the folder."""
    rows = gr.State(listing(session))
    enabled = gr.State([])  # the blend's names, in the order enabled; changes only when one is turned on or off
    shown_blocks = model_blocks(session)
    overlaps_cache: dict = {}  # (file version, file version) -> {block: cosine}, shared by every user
    with gr.Row(equal_height=True):
        gr.Markdown("**imglora**: blend and compare LoRA adapters")
        refresh = gr.Button("Refresh the folder", elem_id="refresh", size="sm", scale=0, min_width=150)
    current = gr.Textbox(summary(Blend()), label="Current blend", interactive=False, elem_id="blend-summary")
    overlaps = gr.Textbox(label="Overlap warnings", interactive=False, lines=1, max_lines=6, visible=False,
                          elem_id="blend-warnings")
    separate_te = gr.Checkbox(False, label="Separate text-encoder weights", elem_id="separate-te", scale=2,
                              container=False, render=False)  # shown beside the search box, below the sliders

    @gr.render(inputs=[enabled, blend, separate_te], triggers=[enabled.change, separate_te.change])
    def enabled_rows(names, user_blend, separate):
        for name in names:
            mine = (user_blend or {}).get(name)
            if not mine:
                continue
            values = block_values(mine.get("blocks"))
            with gr.Group(elem_classes=["adapter-row"], key=f"row-{name}"):
                with gr.Row(equal_height=True):
                    on = gr.Checkbox(True, label=name, key=f"on-{name}", elem_id=f"on-{name}", scale=2,
                                     min_width=120, interactive=True)
                    w = gr.Slider(-2, 2, value=mine["weight"], step=0.05, label="weight", key=f"w-{name}",
                                  elem_id=f"w-{name}", scale=3, interactive=True)
                    te = gr.Slider(-2, 2, value=mine["te"] if mine.get("te") is not None else mine["weight"],
                                   step=0.05, label="text encoder", key=f"te-{name}", elem_id=f"te-{name}",
                                   visible=bool(separate), scale=3, interactive=True)
                with gr.Row(equal_height=True):
                    preset = gr.Dropdown(BLOCK_CHOICES, value=preset_of(mine.get("blocks")), show_label=False,
                                         container=False, key=f"blocks-{name}", elem_id=f"blocks-{name}", scale=2,
                                         min_width=120, interactive=True)
                    steps = gr.Textbox(mine.get("schedule") or "", show_label=False, container=False, max_lines=1,
                                       placeholder="steps: start=2:stop=10, keyframes 0@0,1@0.5",
                                       key=f"steps-{name}", elem_id=f"steps-{name}", scale=3, interactive=True)
                # One closed accordion for the card and the block editor keeps a row short.
                with gr.Accordion(f"{name} card · block weights", open=False, key=f"card-{name}") as acc:
                    with gr.Row():  # rows wrap: as many boxes a line as fit
                        numbers = [gr.Number(values[block], label=block, key=f"bw-{name}-{block}",
                                             elem_id=f"bw-{name}-{block}", minimum=-WEIGHT_LIMIT, maximum=WEIGHT_LIMIT,
                                             step=0.1, min_width=80, interactive=True) for block in shown_blocks]
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

            # Block weights and steps change only the blend: nothing is loaded or reloaded. They listen to
            # .input (the user's edits), so a preset filling the editor does not echo back as an edit.
            def pick(b, choice, name=name):
                if choice == "custom":  # keep the weights as they are, and open the editor on them
                    return (gr.skip(), gr.skip(), gr.Accordion(open=True), card_text(session.catalogue, name),
                            *[gr.skip()] * len(shown_blocks))
                new = set_options(session.catalogue, b, name, blocks=choice)
                values = block_values(new[name]["blocks"])
                return (new, summary(active_weights(session.catalogue, new)), gr.skip(), gr.skip(),
                        *[values[block] for block in shown_blocks])
            preset.input(in_page(pick), [blend, preset], [blend, current, acc, card, *numbers],
                         api_visibility="private")

            def edit(b, *values, name=name):
                if any(v is None for v in values):  # a box being typed into (empty, or just '-')
                    return gr.skip(), gr.skip(), gr.skip()
                new = set_options(session.catalogue, b, name, blocks=blocks_from_editor(shown_blocks, values))
                return new, summary(active_weights(session.catalogue, new)), preset_of(new[name]["blocks"])
            gr.on([n.input for n in numbers], in_page(edit), [blend, *numbers], [blend, current, preset],
                  api_visibility="private", trigger_mode="always_last")

            def schedule(b, text, name=name):
                new = set_options(session.catalogue, b, name, schedule=text or "")
                return new, summary(active_weights(session.catalogue, new)), new[name]["schedule"] or ""
            gr.on([steps.submit, steps.blur], in_page(schedule), [blend, steps], [blend, current, steps],
                  api_visibility="private")

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
        api_blocks, api_steps, api_options = gr.Textbox(), gr.Textbox(), gr.Button()
    api_set.click(in_page(partial(api_set_adapter, session)), [blend, api_name_box, api_on, api_weight, api_te],
                  [blend, current], api_name="set_adapter")
    api_options.click(in_page(partial(api_set_options, session)), [blend, api_name_box, api_blocks, api_steps],
                      [blend, current], api_name="set_options")
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

    def warnings_box(b):
        text = overlap_warnings(session, b, overlaps_cache)
        return gr.update(value=text, visible=bool(text))
    current.change(in_page(warnings_box), blend, overlaps, api_visibility="private", trigger_mode="always_last")

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

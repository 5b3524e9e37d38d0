"""A user's blend: which adapters are on, at which weights. It lives in a `gr.State`, one per browser tab.

A blend is a plain dict `{name: {"on": bool, "weight": float, "te": float | None, "file": version,
"blocks": str | None, "schedule": str | None}}`; `te` is the text-encoder weight when it differs from the
UNet weight (A1111's te/unet multipliers), and `file` the catalogue's `Entry.version` when it was enabled, so
a name that later means another file is refused rather than used (catalogue.py). `blocks` is LBW's block
weights (a preset name or a number list, lora/blocks.py) and `schedule` the steps the UNet part is on or its
keyframes, written as in a prompt tag (`start=2:stop=10`, `0@0,1@0.5`; lora/schedule.py). Functions here
return new dicts and never change the one passed in, so a generation that took a blend keeps it
while the user edits theirs.
"""

from __future__ import annotations

import math
import re

from imglora.errors import ImgloraError
from imglora.lora.blocks import PRESETS, block_weights, spec_of
from imglora.lora.schedule import Schedule
from imglora.lora.state import Blend
from imglora.lora.tags import Options, blend_of, parse_options

from .catalogue import Catalogue, check_name

WEIGHT_LIMIT = 10.0
# A1111 syntax (extensions-builtin/Lora/extra_networks_lora.py): <lora:name>, <lora:name:w>,
# <lora:name:te:unet>, and the LBW/loractl options after it (lora/tags.py); a name is looked up, never
# opened as a path.
LORA_TAG = re.compile(r"<lora:([^:<>]*)((?::[^:<>]*)*)>", re.IGNORECASE)
SCHEDULE_HINT = "write start=N, stop=N, step=A-B and/or keyframes W@STEP,W@STEP, joined by ':'"


def _weight(value, what: str) -> float:
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise ImgloraError(f"{what} {value!r} is not a number", "use a number such as 0.8") from None
    if not math.isfinite(w) or abs(w) > WEIGHT_LIMIT:
        raise ImgloraError(f"{what} {value!r} is out of range", f"use a weight between -{WEIGHT_LIMIT:g} and "
                                                                 f"{WEIGHT_LIMIT:g}")
    return w


def options(items: list[str], what: str) -> Options:
    """parse_options with the app's weight limit (block weights included); a bad option is one clear line."""
    try:
        o = parse_options(items, WEIGHT_LIMIT)
    except ValueError as e:
        raise ImgloraError(f"{what}: {e}", "options as in A1111: <lora:name:0.8>, <lora:name:te:unet>, lbw=IND, "
                                           "start=2, stop=10, step=2-10, keyframes 0@0,1@0.5") from None
    _check_limit(o.blocks, what)
    if o.te is not None and o.te == o.weight:
        o.te = None  # '0.5:0.50' is one weight for both
    return o


def _check_limit(blocks: tuple | None, what: str) -> None:
    if blocks is not None and any(abs(b) > WEIGHT_LIMIT for b in blocks):
        raise ImgloraError(f"{what}: block weights must lie between -{WEIGHT_LIMIT:g} and {WEIGHT_LIMIT:g}", "")


def check_blocks(spec) -> str | None:
    """A preset name or 12/17/20/26 numbers -> the shortest text for them (None, for "", "off" or None: no block
    weights)."""
    if spec is None or str(spec).strip() in ("", "off"):
        return None
    try:
        blocks = block_weights(str(spec))
    except ValueError as e:
        raise ImgloraError(str(e), "choose a preset, or give one number per block") from None
    _check_limit(blocks, "your blend")
    return spec_of(blocks)


def parse_schedule(text) -> Schedule:
    """'start=2:stop=10', 'step=2-10', keyframes '0@0,1@0.5', or these joined by ':' -> the Schedule (empty: none)."""
    items = [i.strip() for i in str(text or "").split(":") if i.strip()]
    for item in items:
        key = item.partition("=")[0].strip().lower() if "=" in item else None
        if key not in ("start", "stop", "step") and not (key is None and "@" in item):
            raise ImgloraError(f"schedule {text!r}: {item!r} is not a step option", SCHEDULE_HINT)
    return options(items, f"schedule {text!r}").schedule


def check_schedule(text) -> str | None:
    """A schedule's text in its normal form (None: no schedule)."""
    return schedule_text(parse_schedule(text))


def schedule_text(schedule: Schedule) -> str | None:
    return ":".join(p for p in [schedule.keys_text(), *schedule.tag_parts()] if p) or None


def set_adapter(catalogue: Catalogue, blend: dict | None, name, on: bool, weight, te_weight=None,
                keep_file: bool = False, blocks=None, schedule=None) -> dict:
    """A new blend with one adapter changed. The name must be in the adapters list; nothing is read.

    Turning an adapter off removes it, and needs only a well-formed name, so an adapter that has left
    the folder can still be taken out of a blend. Enabling takes the file listed under the name now;
    keep_file (a weight slider moving) keeps the file it was enabled with. blocks and schedule (None:
    keep the adapter's own, "" or "off": none) as check_blocks and check_schedule read them.
    """
    new = {k: dict(v) for k, v in (blend or {}).items()}
    if not on:
        new.pop(check_name(name), None)
        return new
    entry = catalogue.get(name)
    te = None if te_weight is None or te_weight == "" else _weight(te_weight, "text-encoder weight")
    old = new.get(name, {})
    version = old["file"] if keep_file and old.get("file") else entry.version
    new[name] = {"on": True, "weight": _weight(weight, "weight"), "te": te, "file": version,
                 "blocks": old.get("blocks") if blocks is None else check_blocks(blocks),
                 "schedule": old.get("schedule") if schedule is None else check_schedule(schedule)}
    return new


def set_options(catalogue: Catalogue, blend: dict | None, name, blocks=None, schedule=None) -> dict:
    """A new blend with an enabled adapter's block weights and/or schedule changed (None: as they are)."""
    mine = (blend or {}).get(check_name(name))
    if not mine:
        raise ImgloraError(f"adapter {name!r} is not in your blend", "enable it first")
    return set_adapter(catalogue, blend, name, True, mine["weight"], mine.get("te"), keep_file=True, blocks=blocks,
                       schedule=schedule)


def from_options(catalogue: Catalogue, blend: dict | None, name: str, o: Options) -> dict:
    """A new blend with `name` enabled as a prompt tag's options say (PNG info's Send to Generate)."""
    return set_adapter(catalogue, blend, name, True, o.weight, o.te, blocks=spec_of(o.blocks) if o.blocks else "",
                       schedule=schedule_text(o.schedule) or "")


def prune(catalogue: Catalogue, blend: dict | None) -> tuple[dict, list[str]]:
    """(the blend without adapters that are no longer usable or now name another file, their names)."""
    kept, dropped = {}, []
    for name, v in (blend or {}).items():
        try:
            catalogue.get(name, v.get("file"))
            kept[name] = dict(v)
        except ImgloraError:
            dropped.append(name)
    return kept, dropped


def pins(blend: dict | None) -> dict[str, tuple]:
    """{name: the file version it was enabled with} of every enabled adapter."""
    return {n: v["file"] for n, v in (blend or {}).items() if v.get("on") and v.get("file")}


def parse_prompt(prompt: str) -> tuple[str, dict[str, Options]]:
    """Strip <lora:...> tags from a prompt; returns (clean prompt, {name: its options})."""
    found: dict[str, Options] = {}
    for m in LORA_TAG.finditer(prompt or ""):
        name = check_name(m.group(1))
        found[name] = options(m.group(2).split(":")[1:], f"<lora:{name}{m.group(2)}>")
    clean = re.sub(r"\s{2,}", " ", LORA_TAG.sub(" ", prompt or "")).strip(" ,")
    return clean, found


def panel_options(v: dict) -> Options:
    """One adapter of the blend dict as the options of a prompt tag."""
    weight = _weight(v["weight"], "weight")
    te = None if v.get("te") is None else _weight(v["te"], "text-encoder weight")
    extra = [f"lbw={v['blocks']}"] if v.get("blocks") else []
    extra += [i for i in (v.get("schedule") or "").split(":") if i.strip()]
    o = options(extra, "your blend")
    if o.schedule.keys:  # loractl: keyframes are the UNet weight itself, as in a tag
        weight = o.weight
    return Options(weight, None if te == weight else te, o.blocks, o.schedule)


def active_weights(catalogue: Catalogue, blend: dict | None, prompt_loras: dict | None = None) -> Blend:
    """Every enabled adapter, the prompt's tags overriding the blend (the whole tag, as in A1111)."""
    out = {name: panel_options(v) for name, v in (blend or {}).items() if v.get("on")}
    out.update(prompt_loras or {})
    pinned = pins(blend)
    for name in out:
        # Every name must be a usable adapter of the folder, and still the file the blend enabled
        # (a prompt tag is a name lookup now, as in A1111).
        catalogue.get(name, None if name in (prompt_loras or {}) else pinned.get(name))
    return blend_of(out)


def summary(blend: Blend) -> str:
    if not blend:
        return "no adapters (the base model)"
    parts = []
    for name, (w, te) in blend.pairs().items():
        extra = [f"text encoder {te:g}"] if te is not None else []
        if name in blend.blocks:
            extra.append(f"blocks {spec_of(blend.blocks[name])}")
        if blend.schedules.get(name):
            extra.append(f"steps {schedule_text(blend.schedules[name])}")
        parts.append(f"{name} {w:g}" + (f" ({'; '.join(extra)})" if extra else ""))
    return ", ".join(parts)


def preset_of(spec: str | None) -> str:
    """The block preset dropdown's value for a stored spec."""
    return "off" if spec is None else spec if spec in PRESETS else "custom"

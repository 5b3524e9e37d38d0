"""A user's blend: which adapters are on, at which weights. It lives in a `gr.State`, one per browser tab.

A blend is a plain dict `{name: {"on": bool, "weight": float, "te": float | None, "file": version}}`; `te`
is the text-encoder weight when it differs from the UNet weight (A1111's te/unet multipliers), and `file`
the catalogue's `Entry.version` when it was enabled, so a name that later means another file is refused
rather than used (catalogue.py). Functions here
return new dicts and never change the one passed in, so a generation that took a blend keeps it
while the user edits theirs.
"""

from __future__ import annotations

import math
import re

from imglora.errors import ImgloraError
from imglora.lora.state import Blend

from .catalogue import Catalogue, check_name

WEIGHT_LIMIT = 10.0
# A1111 syntax (extensions-builtin/Lora/extra_networks_lora.py): <lora:name>, <lora:name:w>,
# <lora:name:te:unet>; a name is looked up, never opened as a path.
LORA_TAG = re.compile(r"<lora:([^:<>]*)((?::[^:<>]*){0,2})>", re.IGNORECASE)


def _weight(value, what: str) -> float:
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise ImgloraError(f"{what} {value!r} is not a number", "use a number such as 0.8") from None
    if not math.isfinite(w) or abs(w) > WEIGHT_LIMIT:
        raise ImgloraError(f"{what} {value!r} is out of range", f"use a weight between -{WEIGHT_LIMIT:g} and "
                                                                 f"{WEIGHT_LIMIT:g}")
    return w


def set_adapter(catalogue: Catalogue, blend: dict | None, name, on: bool, weight, te_weight=None,
                keep_file: bool = False) -> dict:
    """A new blend with one adapter changed. The name must be in the adapters list; nothing is read.

    Turning an adapter off removes it, and needs only a well-formed name, so an adapter that has left
    the folder can still be taken out of a blend. Enabling takes the file listed under the name now;
    keep_file (a weight slider moving) keeps the file it was enabled with.
    """
    new = {k: dict(v) for k, v in (blend or {}).items()}
    if not on:
        new.pop(check_name(name), None)
        return new
    entry = catalogue.get(name)
    te = None if te_weight is None or te_weight == "" else _weight(te_weight, "text-encoder weight")
    version = new[name]["file"] if keep_file and new.get(name, {}).get("file") else entry.version
    new[name] = {"on": True, "weight": _weight(weight, "weight"), "te": te, "file": version}
    return new


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


def parse_prompt(prompt: str) -> tuple[str, dict[str, tuple[float, float | None]]]:
    """Strip <lora:...> tags from a prompt; returns (clean prompt, {name: (unet weight, te weight)})."""
    found: dict[str, tuple[float, float | None]] = {}
    for m in LORA_TAG.finditer(prompt or ""):
        name = check_name(m.group(1))
        args = [a.strip() for a in m.group(2).split(":")[1:]]
        if not args or args == [""]:
            found[name] = (1.0, None)
        elif len(args) == 1:
            found[name] = (_weight(args[0], f"weight of {name}"), None)
        else:  # A1111 order: te first, then unet
            te, unet = _weight(args[0], f"te weight of {name}"), _weight(args[1], f"unet weight of {name}")
            found[name] = (unet, None if te == unet else te)
    clean = re.sub(r"\s{2,}", " ", LORA_TAG.sub(" ", prompt or "")).strip(" ,")
    return clean, found


def active_weights(catalogue: Catalogue, blend: dict | None, prompt_loras: dict | None = None) -> Blend:
    """Every enabled adapter, the prompt's tags overriding the blend."""
    out = {}
    for name, v in (blend or {}).items():
        if v.get("on"):
            out[name] = (_weight(v["weight"], "weight"), v.get("te"))
    out.update(prompt_loras or {})
    pinned = pins(blend)
    for name in out:
        # Every name must be a usable adapter of the folder, and still the file the blend enabled
        # (a prompt tag is a name lookup now, as in A1111).
        catalogue.get(name, None if name in (prompt_loras or {}) else pinned.get(name))
    return Blend.of(out)


def summary(blend: Blend) -> str:
    if not blend:
        return "no adapters (the base model)"
    return ", ".join(f"{name} {w:g}" + (f" (text encoder {te:g})" if te is not None else "")
                     for name, (w, te) in blend.pairs().items())

"""One adapter's options in A1111's prompt syntax, `<lora:NAME:OPTIONS>`, and in `--lora FILE:OPTIONS`.

OPTIONS are ':'-separated, as A1111 and its extensions read them:
- positional numbers: the text-encoder weight, then the UNet weight (A1111: one number sets both);
- `te=`, `unet=` (A1111); a weight may be loractl keyframes `0@0,1@0.5` (the text encoder takes step 0's);
- `lbw=` (or `w=`): block weights, an LBW preset name or 12/17/20/26 numbers (lora/blocks.py); a positional
  preset name or number list is read as block weights too (LBW's older form);
- `start=N`, `stop=N`, `step=A-B` (LBW; lora/schedule.py says which steps they mean).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .blocks import PRESETS, block_weights
from .schedule import Schedule, parse_keyframes
from .state import Blend


@dataclass
class Options:
    weight: float = 1.0
    te: float | None = None
    blocks: tuple | None = None
    schedule: Schedule = field(default_factory=Schedule)


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a number") from None


def _step(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{what}={text!r}: give a whole step number") from None


def parse_options(items: list[str], limit: float) -> Options:
    """The options after the name (already split on ':'); ValueError naming the bad one."""
    weights, named, blocks = [], {}, None
    for item in (i.strip() for i in items):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if eq:
            key = key.strip().lower()
            if key not in ("te", "unet", "lbw", "w", "start", "stop", "step"):
                raise ValueError(f"unknown option {key}= (use te=, unet=, lbw=, start=, stop= or step=)")
            named["lbw" if key == "w" else key] = value.strip()
        elif item in PRESETS or ("," in item and "@" not in item):
            blocks = item
        else:
            weights.append(item)
    if len(weights) > 2:
        raise ValueError(f"too many weights ({', '.join(weights)}): give the text-encoder weight, then the UNet's")
    te_text = named.get("te", weights[0] if weights else None)
    unet_text = named.get("unet", weights[1] if len(weights) > 1 else None)
    if unet_text is None:
        unet_text = te_text if te_text is not None else "1"
    keys = parse_keyframes(unet_text) if "@" in unet_text else ()
    unet = keys[0][0] if keys else _number(unet_text, "weight")
    te = None
    if te_text is not None and te_text != unet_text:
        te = parse_keyframes(te_text)[0][0] if "@" in te_text else _number(te_text, "text-encoder weight")
    for w in [unet, *(w for w, _ in keys), *([te] if te is not None else [])]:
        if not math.isfinite(w) or abs(w) > limit:
            raise ValueError(f"the weight must be a number from {-limit:g} to {limit:g}, not {w:g}")
    start, stop = named.get("start"), named.get("stop")
    if "step" in named:
        first, dash, last = named["step"].partition("-")
        if not dash:
            raise ValueError(f"step={named['step']!r}: write step=FIRST-LAST, e.g. step=5-10")
        start, stop = first, last
    return Options(unet, te, block_weights(named.get("lbw", blocks)) if named.get("lbw", blocks) else None,
                   Schedule(None if start is None else _step(start, "start"),
                            None if stop is None else _step(stop, "stop"), keys))


def blend_of(options: dict[str, Options], normalize: bool = False) -> Blend:
    """The Blend of {adapter name: its options}."""
    return Blend({n: o.weight for n, o in options.items()},
                 {n: o.te for n, o in options.items() if o.te is not None},
                 {n: o.blocks for n, o in options.items() if o.blocks is not None},
                 {n: o.schedule for n, o in options.items() if o.schedule}, normalize)

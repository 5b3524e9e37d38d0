"""Per-block adapter weights in the layout of hako-mikan's sd-webui-lora-block-weight (LBW), which A1111 and
Forge users write: one multiplier per block of the original (sgm) UNet, BASE for the text encoders.

A block is an `input_blocks.N` (INnn), the `middle_block` (M00) or an `output_blocks.N` (OUTnn) of the
original UNet; LBW finds it in each module's name and leaves modules outside every block (the time
embedding, the last norm and conv) at 1. A list of 17 (SD 1.x LoRA), 26 (SD 1.x LyCORIS/LoCon), 12
(SDXL LoRA) or 20 (SDXL LyCORIS/LoCon) values names its blocks in the order below; the blocks a list
does not name get 0, as LBW's `to26` gives them.
"""

from __future__ import annotations

import math

BLOCKS26 = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
LISTS = {
    12: ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"),
    17: ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(3, 12))),
    20: ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9))),
    26: BLOCKS26,
}
# LBW's built-in presets (DEF_WEIGHT_PRESET), 17 values each.
PRESETS = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
}
INDEX = {b: i for i, b in enumerate(BLOCKS26)}


def block_weights(spec: str) -> tuple[float, ...]:
    """A preset name or 12/17/20/26 comma-separated numbers -> 26 multipliers in BLOCKS26 order.
    ValueError naming what is wrong."""
    text = PRESETS.get(spec.strip(), spec)
    values = [v.strip() for v in text.split(",")]
    if len(values) not in LISTS:
        raise ValueError(f"block weights {spec!r}: give a preset ({', '.join(PRESETS)}) or 12, 17, 20 or 26 "
                         f"numbers, not {len(values)}")
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        raise ValueError(f"block weights {spec!r}: every value must be a number") from None
    if not all(math.isfinite(n) for n in numbers):
        raise ValueError(f"block weights {spec!r}: every value must be finite")
    given = dict(zip(LISTS[len(values)], numbers))
    return tuple(given.get(b, 0.0) for b in BLOCKS26)


def spec_of(weights: tuple[float, ...]) -> str:
    """The shortest way to write 26 multipliers: a preset name, or the shortest list that holds them."""
    for name, text in PRESETS.items():
        if block_weights(text) == tuple(weights):
            return name
    for n in sorted(LISTS):
        if all(w == 0 or b in LISTS[n] for b, w in zip(BLOCKS26, weights)):
            return ",".join(f"{w:g}" for b, w in zip(BLOCKS26, weights) if b in LISTS[n])
    return ",".join(f"{w:g}" for w in weights)


def block_of(key: str, layers_per_block: int = 2) -> str | None:
    """The LBW block of an adapter module key ('unet.down_blocks.1.attentions.0…', 'text_encoder.…'): BASE for
    the text encoders, INnn / M00 / OUTnn for the UNet's blocks by their original (sgm) index, None outside
    them. The index arithmetic is the one of formats/kohya.py's sgm names (tests check the two agree)."""
    component, _, path = key.partition(".")
    if component != "unet":
        return "BASE"
    parts = path.split(".")
    n = layers_per_block + 1  # sgm slots per down/up block: its layers plus the sampler
    if parts[0] == "conv_in":
        return "IN00"
    if parts[0] == "mid_block":
        return "M00"
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 3:
        i, kind, j = int(parts[1]), parts[2], int(parts[3])
        if parts[0] == "down_blocks":
            index = (i + 1) * n if kind == "downsamplers" else i * n + j + 1
            return f"IN{index:02d}"
        index = i * n + layers_per_block if kind == "upsamplers" else i * n + j
        return f"OUT{index:02d}"
    return None


def multiplier(weights: tuple[float, ...] | None, block: str | None) -> float:
    """The multiplier of one block (1 without block weights, and outside every block)."""
    if weights is None or block is None:
        return 1.0
    return weights[INDEX[block]]

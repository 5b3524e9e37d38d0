"""An adapter's UNet weight as a function of the denoising step.

Two forms users already write in A1111 prompts, and both may be given at once:
- LBW's `start=N` / `stop=N` / `step=A-B` (sd-webui-lora-block-weight). Its A1111 code path switches the
  weights in the CFG-denoiser callback, which reads A1111's step counter; that counter is advanced after each
  step, so 0-based steps 0 and 1 both read 0 and step k > 0 reads k - 1, and LBW switches once the counter
  exceeds N - 2. So `stop=N` turns the UNet part off from 0-based step N on, `start=N` on from step N (for
  N >= 2; 0 and 1 mean from the first step). Forge's code path switches one step later; imglora follows A1111.
- loractl's keyframes `w@t,w@t,...` (sd-webui-loractl): the weight interpolated linearly between keyframes
  and held beyond the first and last. t is a 0-based step, or, when every t is at most 1, a fraction of the
  way from the first step (0) to the last (1).
The text encoder runs once per prompt, before the first step: it takes the weight of step 0 and no
start/stop (as in A1111, where the prompt is encoded before the callbacks run).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    start: int | None = None
    stop: int | None = None
    keys: tuple[tuple[float, float], ...] = ()  # (weight, at), sorted by `at`

    def __post_init__(self):
        for name in ("start", "stop"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f"{name}={v!r}: give a step number, 0 or more")
        if any(not (math.isfinite(w) and math.isfinite(t) and t >= 0) for w, t in self.keys):
            raise ValueError("keyframes need finite weights at steps or fractions of 0 or more")

    def __bool__(self) -> bool:
        return self.start is not None or self.stop is not None or bool(self.keys)

    def on(self, step: int) -> bool:
        """Whether the UNet part is on at this 0-based step (LBW's start/stop, A1111 path)."""
        counter = max(step - 1, 0)  # what A1111's step counter reads during this step
        if self.start is not None and not counter > self.start - 2:
            return False
        return self.stop is None or not counter > self.stop - 2

    def weight(self, base: float, step: int, steps: int) -> float:
        """The UNet weight at a 0-based step of `steps`: the keyframes (or `base`), when on."""
        if not self.on(step):
            return 0.0
        return self.keyframed(base, step, steps)

    def keyframed(self, base: float, step: int, steps: int) -> float:
        if not self.keys:
            return base
        fraction = max(t for _, t in self.keys) <= 1.0
        points = [(t * (steps - 1) if fraction else t, w) for w, t in self.keys]
        if step <= points[0][0]:
            return points[0][1]
        for (t0, w0), (t1, w1) in zip(points, points[1:]):
            if step <= t1:
                return w1 if t1 == t0 else w0 + (w1 - w0) * (step - t0) / (t1 - t0)
        return points[-1][1]

    def text_encoder(self, base: float) -> float:
        """The text encoder's weight: step 0's keyframe (the prompt is encoded once), never gated."""
        return self.keyframed(base, 0, 2) if self.keys else base

    def tag_parts(self) -> list[str]:
        """The A1111 prompt-syntax parts that write this schedule back (without the weight)."""
        parts = []
        if self.start is not None:
            parts.append(f"start={self.start}")
        if self.stop is not None:
            parts.append(f"stop={self.stop}")
        return parts

    def keys_text(self) -> str:
        return ",".join(f"{w:g}@{t:g}" for w, t in self.keys)


_KEYFRAME = re.compile(r"^\s*(-?[\d.eE+-]+)\s*(?:@\s*([\d.eE+]+))?\s*$")


def parse_keyframes(text: str) -> tuple[tuple[float, float], ...]:
    """loractl's 'w@t,w@t' (',' or ';' between keyframes; a keyframe without @t is at 1, as in loractl)."""
    keys = []
    for part in re.split(r"[,;]", text):
        m = _KEYFRAME.match(part)
        if not m:
            raise ValueError(f"keyframe {part.strip()!r}: write WEIGHT@STEP, e.g. 0@0,1@0.5")
        try:
            keys.append((float(m.group(1)), float(m.group(2)) if m.group(2) is not None else 1.0))
        except ValueError:
            raise ValueError(f"keyframe {part.strip()!r}: write WEIGHT@STEP, e.g. 0@0,1@0.5") from None
    keys.sort(key=lambda k: k[1])
    Schedule(keys=tuple(keys))  # checks the numbers
    return tuple(keys)

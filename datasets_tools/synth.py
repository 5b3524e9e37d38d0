"""`imglora-data synth shapes OUT --n N`: a deterministic synthetic captioned dataset."""

from __future__ import annotations

from pathlib import Path

from imglora.data.synth import BACKGROUNDS, BASE_SHAPES, COLOURS, NEW_SHAPES, synth_shapes
from imglora.errors import ImgloraError


def synth(out, n: int, seed: int = 0, size: int = 64, shapes=None, colours=None, backgrounds=None,
          words: list[str] = ()) -> list[Path]:
    shapes = tuple(shapes or BASE_SHAPES)
    for name, given, known in (("shape", shapes, BASE_SHAPES + NEW_SHAPES), ("colour", colours or (), COLOURS),
                               ("background", backgrounds or (), BACKGROUNDS)):
        unknown = [g for g in given if g not in known]
        if unknown:
            raise ImgloraError(f"unknown {name} {', '.join(unknown)}", f"choose from {', '.join(known)}")
    mapping = {}
    for w in words:
        shape, sep, word = w.partition("=")
        if not sep or not word:
            raise ImgloraError(f"--word {w!r} is not SHAPE=WORD", "e.g. --word star=zorbly")
        mapping[shape] = word
    if Path(out).exists() and any(Path(out).iterdir()):
        raise ImgloraError("output folder is not empty", "choose a new folder", path=out)
    written = synth_shapes(out, n, seed=seed, size=size, shapes=shapes, colours=tuple(colours or COLOURS),
                           backgrounds=tuple(backgrounds or BACKGROUNDS), words=mapping)
    return [p for p, _ in written]

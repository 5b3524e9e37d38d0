"""`imglora-data synth shapes OUT --n N`: a deterministic synthetic captioned dataset
(imglora.synthetic.shapes: coloured shapes on plain backgrounds, "a red circle on a white background")."""

from __future__ import annotations

from pathlib import Path

from imglora.synthetic.shapes import BACKGROUNDS, BASE_SHAPES, COLOURS, NEW_SHAPES, synth_shapes
from imglora.errors import ImgloraError
from imglora.formats.files import atomic_dir


def synth(out, n: int, seed: int = 0, size: int = 64, shapes=None, colours=None, backgrounds=None,
          words: list[str] = ()) -> list[Path]:
    """Write the dataset into a temp folder beside OUT, then rename it into place (OUT must be new or empty)."""
    out = Path(out)
    shapes = tuple(shapes or BASE_SHAPES)
    for name, given, known in (("shape", shapes, BASE_SHAPES + NEW_SHAPES), ("colour", colours or (), tuple(COLOURS)),
                               ("background", backgrounds or (), tuple(BACKGROUNDS))):
        unknown = [g for g in given if g not in known]
        if unknown:
            raise ImgloraError(f"unknown {name} {', '.join(unknown)}", f"choose from {', '.join(known)}")
    mapping = {}
    for w in words:
        shape, sep, word = w.partition("=")
        if not sep or not word.strip() or shape not in shapes:
            raise ImgloraError(f"--word {w!r} is not SHAPE=WORD for a drawn shape", "e.g. --shapes star --word "
                               "star=zorbly")
        mapping[shape] = word.strip()
    if size < 8:
        raise ImgloraError(f"--size {size} is too small", "use 8 px or more (64 is the default)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ImgloraError("already exists and is not an empty folder", "choose a new folder", path=out)
    with atomic_dir(out) as tmp:
        written = synth_shapes(tmp, n, seed=seed, size=size, shapes=shapes, colours=tuple(colours or COLOURS),
                               backgrounds=tuple(backgrounds or BACKGROUNDS), words=mapping)
    return [out / p.name for p, _ in written]

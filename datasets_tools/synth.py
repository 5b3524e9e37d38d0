"""`imglora-data synth shapes OUT --n N`: a deterministic synthetic captioned dataset
(imglora.synthetic.shapes: coloured shapes on plain backgrounds, "a red circle on a white background").
`--distractor MASKS`: beside each shape an uncaptioned distractor, and MASKS/NNNNN.png masks of the main
shape, for `imglora train --masked-loss --mask-dir MASKS`."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from imglora.synthetic.shapes import BACKGROUNDS, BASE_SHAPES, COLOURS, NEW_SHAPES, synth_shapes
from imglora.errors import ImgloraError
from imglora.formats.files import atomic_dir
from imglora.train.masks import inside


def synth(out, n: int, seed: int = 0, size: int = 64, shapes=None, colours=None, backgrounds=None,
          words: list[str] = (), distractor_masks=None) -> list[Path]:
    """Write the dataset into a temp folder beside OUT, then rename it into place (OUT must be new or empty);
    with `distractor_masks`, the masks likewise into that folder (new or empty, outside OUT)."""
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
    masks = Path(distractor_masks) if distractor_masks is not None else None
    for folder in (out, masks) if masks is not None else (out,):
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise ImgloraError("already exists and is not an empty folder", "choose a new folder", path=folder)
    if masks is not None and (inside(masks, out) or inside(out, masks)):
        raise ImgloraError("the mask folder must lie outside the image folder (and the other way round)",
                           "choose a folder beside it, e.g. OUT-masks", path=masks)
    with atomic_dir(out) as tmp, (atomic_dir(masks) if masks is not None else nullcontext()) as tmp_masks:
        written = synth_shapes(tmp, n, seed=seed, size=size, shapes=shapes, colours=tuple(colours or COLOURS),
                               backgrounds=tuple(backgrounds or BACKGROUNDS), words=mapping, masks_dir=tmp_masks)
    return [out / p.name for p, _ in written]

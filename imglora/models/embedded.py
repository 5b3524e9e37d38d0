"""The embedded base model: a tiny Stable Diffusion 1.x-style pipeline shipped inside the package.

It was pretrained from scratch by `python -m imglora.synthetic.pretrain` on the synthetic shapes of
`imglora.synthetic.shapes` (base vocabulary only), so training, generation and the app work offline on a
fresh machine. Its generation defaults (resolution, steps, guidance) are in its imglora.json.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ImgloraError

EMBEDDED_MODEL = Path(__file__).resolve().parent.parent / "assets" / "base"


def default_model_path() -> Path:
    """The shipped diffusers folder; an ImgloraError if the install lacks it."""
    if not (EMBEDDED_MODEL / "model_index.json").is_file():
        raise ImgloraError("the embedded base model is missing from this install",
                           "reinstall imglora (the package data includes imglora/assets/base), rebuild it with "
                           "`python -m imglora.synthetic.pretrain --out imglora/assets/base`, or pass --model",
                           path=EMBEDDED_MODEL)
    return EMBEDDED_MODEL

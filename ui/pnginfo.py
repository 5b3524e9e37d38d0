"""PNG info (A1111's tab of that name): read the `parameters` text of a PNG and turn it back into settings.

A dropped PNG is someone else's file: it is opened as PNG only, its pixels are never decoded (the text
chunks come first), and its text is only ever shown as text.
"""

from __future__ import annotations

import re
import warnings

from PIL import Image, UnidentifiedImageError

from imglora.errors import ImgloraError

from .blend import LORA_TAG, options
from .catalogue import Catalogue, check_name
from .session import SCHEDULERS

# A1111's "Key: value" pairs of the settings line (modules/infotext_utils.py re_param); values may be quoted.
_PARAM = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
# The sampler names imglora writes (the scheduler's class name) and A1111's, to the app's scheduler labels.
_SAMPLERS = {"Euler": "Euler", "EulerAncestral": "Euler a", "Euler a": "Euler a", "DPMSolverMultistep": "DPM++ 2M",
             "DPM++ 2M": "DPM++ 2M", "DPM++ 2M Karras": "DPM++ 2M Karras", "DDIM": "DDIM", "UniPCMultistep": "UniPC",
             "UniPC": "UniPC"}


def read_parameters(path) -> str:
    """The `parameters` text of a PNG file ("" when it has none)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=["PNG"]) as image:
                text = image.info.get("parameters", "")
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImgloraError("not a PNG image this app can read", "drop a PNG saved by imglora or A1111") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImgloraError(f"unreadable PNG ({e})", "drop a PNG saved by imglora or A1111") from None
    return text if isinstance(text, str) else ""


def parse_parameters(text: str) -> dict:
    """A1111 parameters text -> {"prompt", "negative", and any of "Steps", "Sampler", "CFG scale", "Seed",
    "Size", ... as strings}. The settings line is the last one that starts with "Steps:"."""
    lines = (text or "").strip().splitlines()
    settings = {}
    if lines and lines[-1].startswith("Steps:"):
        settings = {k.strip(): v.strip().strip('"') for k, v in _PARAM.findall(lines.pop())}
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    return {"prompt": "\n".join(prompt).strip(), "negative": "\n".join(negative).strip(), **settings}


def to_settings(catalogue: Catalogue, text: str, default_sampler: str) -> tuple[dict, dict, list[str]]:
    """(settings for the Generate tab, {adapter: its tag's Options} from the prompt's tags, notes).

    The prompt's <lora:...> tags become the blend (what the image was made with: weights, block weights,
    schedules); a tag naming no usable adapter of this folder, or with options this app cannot read, is left
    out, and said so. default_sampler: the model's own scheduler name, which maps to "model default" so
    that the image comes out the same.
    """
    p = parse_parameters(text)
    if not p["prompt"] and "Steps" not in p:
        raise ImgloraError("no generation parameters found", "drop a PNG saved by imglora or A1111, or paste its "
                                                              "parameters text")
    notes, loras = [], {}
    for m in LORA_TAG.finditer(p["prompt"]):
        name = m.group(1)
        try:
            catalogue.get(check_name(name))
        except ImgloraError:
            notes.append(f"{name} (not usable here)")
            continue
        try:
            loras[name] = options(m.group(2).split(":")[1:], name)
        except ImgloraError as e:
            notes.append(f"{e.what} (options this app cannot read)")
    out = {"prompt": re.sub(r"\s{2,}", " ", LORA_TAG.sub(" ", p["prompt"])).strip(" ,"), "negative": p["negative"]}
    numbers = {"steps": ("Steps", int), "guidance": ("CFG scale", float), "seed": ("Seed", int)}
    for key, (label, kind) in numbers.items():
        if label in p:
            try:
                out[key] = kind(p[label])
            except ValueError:
                notes.append(f"{label} {p[label]!r}")
    if "Size" in p:
        try:
            out["width"], out["height"] = (int(v) for v in p["Size"].lower().split("x"))
        except ValueError:
            notes.append(f"Size {p['Size']!r}")
    sampler = p.get("Sampler")
    if sampler:
        label = "model default" if sampler == default_sampler else _SAMPLERS.get(sampler)
        if label in SCHEDULERS:
            out["scheduler"] = label
        else:
            notes.append(f"Sampler {sampler!r}")
    return out, loras, notes

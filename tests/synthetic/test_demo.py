"""A short run of `imglora demo`'s pipeline on the shipped model: data, training, export, before/after, scores."""

import re

from PIL import Image

from imglora.formats.inspect import describe
from imglora.synthetic.demo import run_demo, summary_line


def test_short_demo_run(tmp_path):
    result = run_demo(output=str(tmp_path / "demo"), steps=6, n_images=16, seeds=1, log=lambda *_: None)
    # The adapter is a kohya file for the embedded (SD 1.x-style) model, with the text encoder trained.
    info = describe(result["adapter"])
    assert info["format"] == "kohya" and info["base_model"] == "sd1", info
    assert set(info["targets"]) == {"unet", "text_encoder"}, info["targets"]
    grid = Image.open(result["grid"])
    assert grid.width > 2 * 64 and grid.height > 3 * 64  # two columns (before | after), labelled rows
    assert grid.text["parameters"].startswith("imglora demo")
    for key in ("concept_before", "concept_after", "base_before", "base_after"):
        assert 0.0 <= result[key] <= 1.0
    # Six steps cannot teach the shape; the base model never draws it before training.
    assert result["concept_before"] <= 0.2
    assert abs(result["base_change"] - (result["base_after"] - result["base_before"])) < 1e-9
    assert re.fullmatch(r"concept_before=\d\.\d\d concept_after=\d\.\d\d base_change=[+-]\d\.\d\d",
                        summary_line(result))

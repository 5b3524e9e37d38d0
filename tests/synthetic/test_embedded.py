"""The shipped base model and judge: offline loading, generation the judge agrees with, held-out accuracy."""

import json
import os

import pytest
import torch

from imglora.errors import ImgloraError
from imglora.models import embedded
from imglora.models.embedded import EMBEDDED_MODEL, default_model_path
from imglora.pipeline import model_of
from imglora.synthetic.judge import JUDGE_PATH, accuracy, evaluate, load_judge, render_labelled
from imglora.synthetic.shapes import BACKGROUNDS, BASE_SHAPES, COLOURS, NEW_SHAPES


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest: nothing may be downloaded
    p = StableDiffusionPipeline.from_pretrained(default_model_path(), local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def judge():
    return load_judge()


def test_shipped_folder_is_a_small_sd1_model():
    files = [p for p in EMBEDDED_MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20 * 2**20
    assert JUDGE_PATH.stat().st_size < 1 * 2**20
    index = json.loads((EMBEDDED_MODEL / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    defaults = json.loads((EMBEDDED_MODEL / "imglora.json").read_text())
    assert defaults["resolution"] == 64 and defaults["steps"] <= 30


def test_pipeline_shape(pipe):
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64  # the default height and width
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    attn = [n for n, _ in pipe.unet.named_modules() if n.endswith(("attn1.to_q", "attn2.to_k", "attn2.to_out.0"))]
    assert len(attn) >= 3 * 5  # cross-attention in every block, for LoRA to target


def test_caption_words_are_single_tokens_and_new_shapes_are_not(pipe):
    tok = pipe.tokenizer
    for word in [*COLOURS, *BACKGROUNDS, *BASE_SHAPES, "background", "on"]:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    for word in NEW_SHAPES:  # never seen in pretraining: spelled as bytes
        assert len(tok(word, add_special_tokens=False).input_ids) == len(word), word


def test_generations_have_the_prompted_colour(pipe, judge):
    prompts = [(f"a {c} {s} on a white background", {"colour": c, "shape": s})
               for c, s in [("red", "circle"), ("blue", "square"), ("green", "triangle")]]
    result = evaluate(model_of(pipe, default_model_path()), prompts, seeds=2, steps=20, judge=judge, keep_images=True)
    assert result["images"][0].size == (64, 64)
    assert result["colour"] == 1.0, result["predictions"]
    assert result["shape"] >= 0.5, result["predictions"]


def test_judge_on_held_out_renders(judge):
    pixels, labels = render_labelled(64, seed=4242)  # training used seed 0, its check seed 1000
    clean = accuracy(judge.net, pixels, labels)
    noisy = accuracy(judge.net, pixels, labels, torch.Generator().manual_seed(7))
    assert clean["colour"] >= 0.98 and clean["shape"] >= 0.95 and clean["background"] >= 0.98, clean
    assert noisy["colour"] >= 0.95 and noisy["shape"] >= 0.9, noisy


def test_missing_model_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setattr(embedded, "EMBEDDED_MODEL", tmp_path / "base")
    with pytest.raises(ImgloraError, match="embedded base model is missing"):
        embedded.default_model_path()

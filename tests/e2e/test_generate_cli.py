"""`imglora generate` gives the image diffusers gives with the same adapters (load_lora_weights + set_adapters)."""

import numpy as np
import pytest
import torch
from PIL import Image

from imglora.cli import main
from imglora.formats.lora_file import save_adapter
from imglora.lora.adapters import Adapters


@pytest.fixture
def model_and_loras(make_pipe, tmp_path):
    pipe = make_pipe("sd1")
    pipe.save_pretrained(tmp_path / "model")
    files = []
    for i, preset in enumerate(("cross-attn", "attn")):
        adapters = Adapters(make_pipe("sd1"))
        params = adapters.create("x", adapters.targets(preset, text_encoder=i == 0), rank=4, alpha=2.0)
        g = torch.Generator().manual_seed(i)
        for p in params:
            p.data = torch.randn(p.shape, generator=g) * 0.3
        adapter = adapters.export("x")
        adapter.arch = "sd1"
        files.append(save_adapter(tmp_path / f"lora{i}.safetensors", adapter))
    return tmp_path / "model", files


def test_generate_equals_diffusers_with_the_same_adapters(model_and_loras, tmp_path):
    from diffusers import StableDiffusionPipeline

    model, (a, b) = model_and_loras
    out = tmp_path / "ours.png"
    args = ["generate", "--model", str(model), "--lora", f"{a}:0.7", "--lora", f"{b}:-0.5", "--prompt", "a red circle",
            "--negative", "square", "--seed", "5", "--steps", "3", "--guidance", "4", "--width", "32", "--height", "32",
            "--out", str(out)]
    assert main(args) == 0
    ours = np.asarray(Image.open(out)).astype(int)

    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True, safety_checker=None)
    pipe.load_lora_weights(str(a), adapter_name="a")
    pipe.load_lora_weights(str(b), adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, -0.5])
    theirs = pipe("a red circle", negative_prompt="square", num_inference_steps=3, guidance_scale=4, width=32,
                  height=32, generator=torch.Generator("cpu").manual_seed(5)).images[0]
    theirs = np.asarray(theirs).astype(int)
    pipe.disable_lora()
    base = np.asarray(pipe("a red circle", negative_prompt="square", num_inference_steps=3, guidance_scale=4,
                           width=32, height=32, generator=torch.Generator("cpu").manual_seed(5)).images[0]).astype(int)
    assert np.abs(ours - base).max() > 10  # the adapters change the image
    assert np.abs(ours - theirs).max() <= 1  # equal up to 8-bit rounding of float noise

    text = Image.open(out).text["parameters"]
    assert "<lora:lora0:0.7> <lora:lora1:-0.5>" in text and "Seed: 5" in text and "Negative prompt: square" in text
    # Asking again for the same file is refused, and the image is untouched.
    before = out.read_bytes()
    assert main(args) == 2
    assert out.read_bytes() == before


def test_grid_of_blends_equals_single_generations(model_and_loras):
    from imglora.generate import GenerateArgs, generate
    from imglora.pipeline import attach, load_model

    folder, (a, b) = model_and_loras
    model = load_model(folder)
    adapters = Adapters(model.pipe)
    attach(model, adapters, a, name="a")
    attach(model, adapters, b, name="b")
    blends = [{"a": 0.0, "b": 0.0}, {"a": 1.0}, {"a": 0.5, "b": 0.5}, {"b": -1.0}]
    args = dict(prompt="a red circle", seed=2, steps=2, guidance=3.0, width=32, height=32)
    grid = generate(model, GenerateArgs(**args, blends=blends), adapters)
    for blend, image in zip(blends, grid):
        adapters.set_weight("a", blend.get("a", 0.0))
        adapters.set_weight("b", blend.get("b", 0.0))
        alone = generate(model, GenerateArgs(**args), adapters)[0]
        assert np.abs(np.asarray(image).astype(int) - np.asarray(alone).astype(int)).max() <= 1


@pytest.fixture
def model_never_loads(monkeypatch):
    import imglora.pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(imglora.pipeline, "load_model", refuse)


def _one_line(capsys, *words):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("imglora: ") and all(w in err[0] for w in words), err


@pytest.mark.parametrize("flags,words", [
    (["--width", "30"], ("--width: 30 is not a positive multiple of 8", "use e.g. 24")),
    (["--height", "0"], ("--height: 0 is not a positive multiple of 8",)),
    (["--width", "-64"], ("--width: -64",)),
    (["--width", "wide"], ("--width: 'wide' is not a whole number",)),
    (["--batch", "0"], ("--batch: 0 is out of range",)),
    (["--steps", "0"], ("--steps: 0 is below 1",)),
    (["--steps", "-5"], ("--steps: -5 is below 1",)),
    (["--guidance", "nan"], ("--guidance: nan is not a finite number",)),
    (["--guidance", "inf"], ("--guidance: inf is not a finite number",)),
    (["--seed", "-1"], ("--seed: -1 is out of range",)),
    (["--lora", "x.safetensors:nan"], ("'x.safetensors:nan': the weight must be a number from -100 to 100, not nan",)),
    (["--lora", "x.safetensors:inf"], ("not inf",)),
    (["--lora", "x.safetensors:-inf"], ("not -inf",)),
    (["--lora", "x.safetensors:1e30"], ("not 1e+30",)),
    (["--lora", "x.safetensors:-101"], ("not -101",)),
])
def test_every_number_is_checked_before_the_model_loads(model_never_loads, tmp_path, capsys, flags, words):
    out = tmp_path / "x.png"
    assert main(["generate", "--prompt", "a red circle", "--out", str(out), *flags]) == 2
    _one_line(capsys, *words)
    assert not out.exists()


def test_a_missing_adapter_or_an_existing_output_is_refused_before_anything_renders(model_never_loads, tmp_path,
                                                                                      capsys):
    out = tmp_path / "x.png"
    assert main(["generate", "--prompt", "a", "--lora", f"{tmp_path / 'gone.safetensors'}:0.5", "--out", str(out)]) == 2
    _one_line(capsys, "gone.safetensors: cannot read")
    out.write_bytes(b"my picture")
    assert main(["generate", "--prompt", "a", "--out", str(out)]) == 2
    _one_line(capsys, "x.png: already exists", "nothing was rendered", "--overwrite")
    assert out.read_bytes() == b"my picture"
    (tmp_path / "b-1.png").write_bytes(b"second of a batch")
    assert main(["generate", "--prompt", "a", "--out", str(tmp_path / "b.png"), "--batch", "3"]) == 2
    _one_line(capsys, "b-1.png: already exists")
    assert not (tmp_path / "b-0.png").exists()

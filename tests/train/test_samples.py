"""Training samples follow the run: its resolution, kohya's per-prompt options, its adapter name; and a
sample-prompt file that cannot be used stops the run before step 1, not after the last."""

import pytest
from PIL import Image

from helpers import train_flags

from imglora.cli import main
from imglora.errors import ImgloraError
from imglora.synthetic.shapes import synth_shapes
from imglora.train.samples import SamplePrompt, parse_sample_prompt, read_sample_prompts


def test_kohya_prompt_options_are_stripped_and_applied():
    got = parse_sample_prompt("a red circle, flat --n blurry, dark --w 100 --h 64 --d 7 --l 3.5 --s 4")
    assert got == SamplePrompt("a red circle, flat", "blurry, dark", width=96, height=64, seed=7, steps=4,
                               guidance=3.5)
    assert parse_sample_prompt("  a cat  ") == SamplePrompt("a cat")
    assert parse_sample_prompt("a--w cat").prompt == "a--w cat"  # an option needs a space before it


def test_a_bad_prompt_file_is_refused_with_its_line(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("# comment\n\na cat --w 64\na dog --s many\n")
    with pytest.raises(ImgloraError, match=r"prompts.txt line 4: --s needs a number, got 'many'"):
        read_sample_prompts([], str(f))
    f.write_bytes(b"\xff\xfe bad")
    with pytest.raises(ImgloraError, match="cannot read the sample prompts"):
        read_sample_prompts([], str(f))


def test_an_unreadable_prompt_file_stops_the_run_before_it_starts(tmp_path, capsys):
    data = tmp_path / "data"
    synth_shapes(data, 4, seed=0, size=32)
    out = tmp_path / "out"
    code = main(["train", "--data", str(data), "--output", str(out), "--steps", "1",
                 "--sample-prompts-file", str(tmp_path / "missing.txt"), *train_flags()])
    assert code == 2 and "missing.txt" in capsys.readouterr().err
    assert not out.exists()  # nothing was trained, so nothing was written


def test_samples_use_the_runs_resolution_options_and_name(tmp_path):
    from imglora.models.tiny import tiny_sd_pipeline

    model = tmp_path / "model"
    tiny_sd_pipeline(tmp_path / "tok").save_pretrained(model)  # native size 16 px
    data = tmp_path / "data"
    synth_shapes(data, 4, seed=0, size=32)
    prompts = tmp_path / "prompts.txt"
    long = "a red circle on a white background, " * 3
    prompts.write_text(f"{long}\na blue square --w 48 --h 40 --s 1 --d 5\n")
    out = tmp_path / "out"
    assert main(["train", "--model", str(model), "--data", str(data), "--output", str(out), "--steps", "2",
                 "--name", "my_style", "--sample-prompts-file", str(prompts), "--sample-steps", "2",
                 *train_flags()]) == 0
    step = out / "samples" / "step-0000002"
    files = sorted(p.name for p in step.iterdir())
    assert files == ["00-my_style-w0.png", "01-my_style-w1.png", "02-my_style-w0.png", "03-my_style-w1.png"]
    first, second = Image.open(step / files[1]), Image.open(step / files[3])
    assert first.size == (32, 32)  # the run's --resolution, not the model's 16
    assert second.size == (48, 40)
    assert "<lora:my_style:1>" in first.text["parameters"] and "Steps: 2," in first.text["parameters"]
    assert "Steps: 1," in second.text["parameters"] and "Seed: 5," in second.text["parameters"]
    assert second.text["parameters"].startswith("a blue square <lora")  # the options are not in the prompt
    grid = Image.open(out / "samples" / "step-0000002.png")
    assert grid.text["parameters"].splitlines()[0] == long.strip()  # the whole prompt, not 40 characters

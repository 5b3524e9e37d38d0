"""Step schedules (LBW's start/stop, loractl's keyframes) against diffusers itself: the same adapters loaded
through load_lora_weights, their weights changed by set_adapters in callback_on_step_end at the same steps."""

import numpy as np
import pytest
import torch
from PIL import Image
from test_generate_cli import model_and_loras  # noqa: F401 (the fixture)

from imglora.cli import main
from imglora.generate import GenerateArgs, generate
from imglora.lora.adapters import Adapters
from imglora.lora.schedule import Schedule
from imglora.lora.tags import blend_of, parse_options
from imglora.pipeline import attach, load_model

STEPS = 5
ARGS = dict(prompt="a red circle", negative="square", seed=3, steps=STEPS, guidance=4.0, width=32, height=32)


def test_lbw_steps_follow_a1111s_code_path():
    """stop=N: the UNet part off from 0-based step N on; start=N: on from step N; 0 and 1 mean the first step."""
    assert [Schedule(stop=3).on(k) for k in range(6)] == [True, True, True, False, False, False]
    assert [Schedule(start=3).on(k) for k in range(6)] == [False, False, False, True, True, True]
    assert all(Schedule(start=1).on(k) for k in range(3)) and not any(Schedule(stop=1).on(k) for k in range(3))
    assert [Schedule(start=2, stop=4).on(k) for k in range(6)] == [False, False, True, True, False, False]
    ramp = Schedule(keys=((0.0, 0.0), (1.0, 0.5)))  # fractions: 0 at the first step, 1 halfway, then held
    assert [ramp.weight(9, k, 5) for k in range(5)] == [0.0, 0.5, 1.0, 1.0, 1.0]
    steps = Schedule(keys=((1.0, 2.0), (0.0, 4.0)))  # absolute steps: held before the first keyframe
    assert [steps.weight(9, k, 6) for k in range(6)] == [1.0, 1.0, 1.0, 0.5, 0.0, 0.0]
    assert Schedule(stop=2).text_encoder(0.7) == 0.7 and ramp.text_encoder(9) == 0.0  # encoded once, at step 0


def _diffusers_with_schedule(folder, files, weights_at):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    for name, f in zip("ab", files):
        pipe.load_lora_weights(str(f), adapter_name=name)

    def set_step(step):
        unet, te = weights_at(step)
        pipe.set_adapters(["a", "b"], [{"unet": u, "text_encoder": t} for u, t in zip(unet, te)])

    def callback(p, i, t, kwargs):
        if i + 1 < STEPS:
            set_step(i + 1)
        return kwargs

    set_step(0)
    image = pipe(ARGS["prompt"], negative_prompt=ARGS["negative"], num_inference_steps=STEPS,
                 guidance_scale=ARGS["guidance"], width=32, height=32, callback_on_step_end=callback,
                 generator=torch.Generator("cpu").manual_seed(ARGS["seed"])).images[0]
    return np.asarray(image).astype(int)


def _loaded(folder, files):
    """The model with the two files attached as 'a' and 'b'."""
    model = load_model(folder)
    adapters = Adapters(model.pipe)
    for name, f in zip("ab", files):
        attach(model, adapters, f, name=name)
    return model, adapters


def test_a_schedule_gives_the_image_diffusers_gives_with_set_adapters_per_step(model_and_loras):  # noqa: F811
    folder, files = model_and_loras
    model, adapters = _loaded(folder, files)
    # The first steps shape this tiny model's image most: the schedules change the weights there.
    blend = blend_of({"a": parse_options(["2", "step=2-4"], 10), "b": parse_options(["0@0,-2@0.5,1@1"], 10)})
    ours = np.asarray(generate(model, GenerateArgs(**ARGS, blend=blend), adapters)[0]).astype(int)

    a_on = [2.0 if Schedule(start=2, stop=4).on(k) else 0.0 for k in range(STEPS)]
    b_keys = [0.0, -1.0, -2.0, -0.5, 1.0]  # 0@0, -2@0.5, 1@1 at steps 0..4 of 5
    assert a_on == [0, 0, 2, 2, 0]
    assert [blend.layer_weight("b", "unet.x", None, k, STEPS) for k in range(STEPS)] == pytest.approx(b_keys)
    theirs = _diffusers_with_schedule(folder, files, lambda k: ([a_on[k], b_keys[k]], [2.0, b_keys[0]]))
    constant = np.asarray(generate(model, GenerateArgs(**ARGS, blend=blend_of({"a": parse_options(["2"], 10)})),
                                   adapters)[0]).astype(int)
    assert np.abs(ours - constant).max() > 10  # the schedule changes the image
    assert np.abs(ours - theirs).max() <= 1


def test_scheduled_blends_in_one_batch_equal_each_alone(model_and_loras):  # noqa: F811
    folder, files = model_and_loras
    model, adapters = _loaded(folder, files)
    rows = [blend_of({"a": parse_options(["2", "stop=2"], 10)}),
            blend_of({"a": parse_options(["0@0,2@1"], 10), "b": parse_options(["1.5", "lbw=OUTALL"], 10)}),
            blend_of({"b": parse_options(["2", "start=2"], 10)})]
    grid = generate(model, GenerateArgs(**ARGS, blends=rows), adapters)
    for row, image in zip(rows, grid):
        alone = generate(model, GenerateArgs(**ARGS, blend=row), adapters)[0]
        assert np.abs(np.asarray(image).astype(int) - np.asarray(alone).astype(int)).max() <= 1


def test_generate_cli_takes_the_prompt_options_and_records_them(model_and_loras, tmp_path):  # noqa: F811
    folder, (a, b) = model_and_loras
    out = tmp_path / "x.png"
    assert main(["generate", "--model", str(folder), "--lora", f"{a}:0.8:lbw=IND:stop=3", "--lora", f"{b}:0@0,1@1",
                 "--prompt", "a red circle", "--steps", "4", "--width", "32", "--height", "32", "--out", str(out)]) == 0
    text = Image.open(out).text["parameters"]
    assert "<lora:lora0:0.8:lbw=IND:stop=3>" in text and "<lora:lora1:0@0,1@1>" in text
    assert main(["generate", "--model", str(folder), "--lora", f"{a}:lbw=1,2", "--prompt", "x"]) == 2

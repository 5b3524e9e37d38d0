"""Hostile and careless training runs: every number is checked before anything loads, a finished run is
never lost at its end, and a run writes only inside its own --output (RELIABILITY.md; issue 15)."""

import fcntl
import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import train_flags

from imglora.cli import main
from imglora.config import TrainConfig
from imglora.synthetic.shapes import synth_shapes


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    synth_shapes(d, 4, seed=1, size=32)
    return d


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--epochs=-1"], "--epochs must be at least 1"),
    (["--alpha", "0"], "--alpha must be above 0, got 0.0 — alpha 0 trains nothing"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--lr=-1e-4"], "--lr must be above 0"),
    (["--max-grad-norm", "inf"], "--max-grad-norm must be a finite number"),
    (["--warmup-steps=-3"], "--warmup-steps must be at least 0"),
    (["--lora-dropout", "1"], "--lora-dropout must be at least 0 and at most 0.99"),
    (["--val-count=-1"], "--val-count must be at least 0"),
    (["--log-every", "0"], "--log-every must be at least 1"),
    (["--seed", str(2**64)], "--seed must be at least 0 and at most"),
    (["--resolution", "36"], "--resolution 36 is not a multiple of 8"),
    (["--bucket-step", "12"], "--bucket-step 12 is not a multiple of 8"),
    (["--resolution", "32", "--bucket-step", "64"], "--resolution 32 is smaller than --bucket-step 64"),
    (["--alpha", "100000"], "alpha 100000 does not fit --save-precision fp16"),
])
def test_every_number_is_checked_before_anything_loads(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    # A model path that does not exist: the check must come first, or this would fail on the model.
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--model", str(tmp_path / "no-model"),
                 "--output", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_output_inside_the_data_or_a_file_is_refused(model_dir, data, tmp_path, capsys):
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(data / "out"),
                 *train_flags(save_precision=None)]) == 2
    assert "inside --data" in capsys.readouterr().err and not (data / "out").exists()
    file = tmp_path / "taken"
    file.write_text("mine")
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(file), *train_flags()]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and file.read_text() == "mine"


def test_a_second_run_into_the_same_output_is_refused_while_the_first_holds_it(model_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".imglora-train.lock", "a+") as held:  # what a running `imglora train` holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242")
        held.flush()
        assert main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--steps", "1",
                     *train_flags()]) == 2
    err = capsys.readouterr().err
    assert "another `imglora train` (pid 4242) is writing to this output folder" in err
    assert not (out / "lora.safetensors").exists()
    # Released (as the system does when a process dies, kill -9 included): the next run goes ahead.
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--steps", "1",
                 *train_flags()]) == 0


def test_weights_too_large_for_fp16_are_saved_in_fp32_not_lost(model_dir, data, tmp_path, capsys):
    from imglora.train.loop import Trainer

    cfg = TrainConfig(model=str(model_dir), data=str(data), output=str(tmp_path / "o"), steps=1, resolution=32,
                      bucket_step=16, rank=2, batch_size=4, workers=1, lr=1e-8, save_precision="fp16")
    cfg.check()
    trainer = Trainer(cfg)
    with torch.no_grad():
        next(iter(trainer.adapters.named_parameters("train").values())).fill_(1e6)  # beyond fp16's 65504
    path = trainer.run()
    assert "does not fit --save-precision fp16; saving in fp32" in capsys.readouterr().out
    tensors = load_file(path)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())


@pytest.mark.parametrize("cache", ["disk", "none"])
def test_an_image_that_vanishes_after_the_scan_costs_a_warning_not_the_run(model_dir, tmp_path, monkeypatch,
                                                                            capsys, cache):
    import imglora.train.loop as loop

    data = tmp_path / "d"
    synth_shapes(data, 6, seed=5, size=32)
    scan = loop.build_data

    def scan_then_delete(*args, **kwargs):
        found = scan(*args, **kwargs)
        (data / "00002.png").unlink()
        return found

    monkeypatch.setattr(loop, "build_data", scan_then_delete)
    cfg = TrainConfig(model=str(model_dir), data=str(data), output=str(tmp_path / "o"), steps=4, resolution=32,
                      bucket_step=16, rank=2, batch_size=2, workers=1, cache_latents=cache, save_every=1)
    cfg.check()
    assert loop.Trainer(cfg).run().is_file()
    assert "00002.png" in capsys.readouterr().out
    assert (tmp_path / "o" / "checkpoints" / "step-0000004" / "COMPLETE").is_file()


def test_resume_applies_a_changed_learning_rate_and_says_so(model_dir, data, tmp_path, capsys):
    from imglora.train.loop import Trainer

    out = tmp_path / "o"
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--steps", "2",
                 "--save-every", "1", *train_flags(lr=1e-3)]) == 0
    cfg = TrainConfig(model=str(model_dir), data=str(data), output=str(out), steps=4, resolution=32, bucket_step=16,
                      rank=4, batch_size=4, workers=1, lr=5e-4, weight_decay=0.05, save_precision="fp32",
                      resume="latest", overwrite=True)
    cfg.check()
    trainer = Trainer(cfg)
    trainer.resume()
    said = capsys.readouterr().out
    assert "--lr 0.0005 (the checkpoint had 0.001) applies from step 2" in said
    assert "--weight-decay 0.05 (the checkpoint had 0.01)" in said
    group = trainer.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(5e-4) and group["weight_decay"] == 0.05
    trainer.lock.release()


def test_a_checkpoint_state_without_its_keys_is_a_one_line_error(model_dir, data, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--steps", "1",
                 "--save-every", "1", *train_flags()]) == 0
    for state in (out / "checkpoints").glob("step-*/state.json"):
        state.write_text(json.dumps({"step": 1}))
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--steps", "2",
                 "--resume", "latest", *train_flags()]) == 2
    said = capsys.readouterr()
    assert "damaged state.json (it lacks identity, schedule, optimizer)" in said.out  # each checkpoint, warned
    assert "no checkpoint could be loaded (all are damaged)" in said.err and "Traceback" not in said.err


def test_a_config_file_that_is_not_utf8_is_a_one_line_error(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_bytes(b'data = "caf\xe9"\n')
    assert main(["train", "--config", str(toml)]) == 2
    err = capsys.readouterr().err
    assert "run.toml" in err and "UTF-8" in err and "Traceback" not in err


def test_a_model_folder_with_pickled_weights_is_refused_before_loading(tmp_path, capsys):
    from imglora.models.tiny import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(tmp_path / "tok")
    pipe.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    pipe.unet.save_pretrained(tmp_path / "m" / "unet", safe_serialization=False)  # a .bin pickle
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "x", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "the unet weights are a pickle, not safetensors" in err and "weights_only" not in err
    assert not (tmp_path / "x.png").exists()


def test_app_and_generate_startup_errors_are_one_line(tmp_path, capsys):
    import pickle
    import socket

    file = tmp_path / "adapters.txt"
    file.write_text("not a folder")
    assert main(["ui", "--adapters", str(file)]) == 2
    assert "--adapters is a file, not a folder" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["ui", "--adapters", str(tmp_path / "a"), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "another --port" in err
    # Single-file models: generate and ui take --model-config as train does (here it reaches the loader,
    # which refuses a pickle before anything runs).
    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(pickle.dumps({"state_dict": {"x": 1}}))
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    for argv in (["generate", "--prompt", "x", "--out", str(tmp_path / "x.png")],
                 ["ui", "--adapters", str(tmp_path / "a"), "--port", str(_free_port())]):
        assert main([*argv[:1], "--model", str(ckpt), "--model-config", str(cfg_dir), *argv[1:]]) == 2
        assert "refused to load the pickle" in capsys.readouterr().err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_os_error_is_one_line_with_the_path(model_dir, data, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "run"  # a folder inside a file cannot be made
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--steps", "1",
                 *train_flags()]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "a-file" in err and "Not a directory" in err
    assert "Traceback" not in err

"""`imglora train` on tiny models and synthetic shapes: it learns, it resumes exactly, it fails clearly."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import train_flags

from imglora.cli import main
from imglora.synthetic.shapes import synth_shapes

FAST = train_flags()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    synth_shapes(d, 12, seed=1, size=32)
    return d


def run_train(*args):
    return main(["train", *map(str, args)])


def losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "logs" / "train.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_loss_goes_down_and_the_file_works_in_diffusers(model_dir, shapes, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "run"
    # A random tiny UNet learns fastest through its convolutions (LoCon); the file also carries TE layers.
    assert run_train("--model", model_dir, "--data", shapes, "--output", out, "--steps", 60, "--targets", "conv",
                     "--train-text-encoder", "--sample-prompt", "a red circle", "--sample-steps", 2,
                     *train_flags(lr=1e-2)) == 0
    values = losses(out)
    assert len(values) == 60
    first, last = sum(values[:10]) / 10, sum(values[-10:]) / 10
    assert last < 0.8 * first, (first, last)
    lora = out / "lora.safetensors"
    meta = json.loads((out / "lora.json").read_text())
    assert meta["rank"] == 4 and meta["targets"] == "conv"
    assert (out / "samples" / "step-0000060.png").is_file()
    assert list((out / "logs" / "tensorboard").iterdir())

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True, safety_checker=None)
    args = dict(prompt="a red circle", num_inference_steps=2, width=32, height=32, output_type="np")
    base = pipe(**args, generator=torch.Generator().manual_seed(0)).images
    import diffusers

    diffusers.utils.logging.enable_propagation()
    pipe.load_lora_weights(str(lora), adapter_name="trained")
    after = pipe(**args, generator=torch.Generator().manual_seed(0)).images
    assert abs(after - base).max() > 1e-3
    te_layers = [m for m in pipe.text_encoder.modules() if hasattr(m, "lora_A") and "trained" in m.lora_A]
    assert len(te_layers) == 12


def test_buckets_caches_and_uncached_training_agree(model_dir, tmp_path):
    data = tmp_path / "mixed"
    data.mkdir()
    sizes = {"wide": (64, 32), "tall": (32, 64), "square": (48, 48), "big": (96, 96)}
    for name, size in sizes.items():
        Image.new("RGB", size, (200, 30, 30)).save(data / f"{name}.png")
        (data / f"{name}.txt").write_text(f"a {name} red thing")
    common = ["--model", model_dir, "--data", data, "--steps", 4, "--seed", 3, *FAST]
    assert run_train(*common, "--output", tmp_path / "mem", "--cache-latents", "memory") == 0
    assert run_train(*common, "--output", tmp_path / "none", "--cache-latents", "none", "--no-cache-text") == 0
    assert run_train(*common, "--output", tmp_path / "disk", "--cache-latents", "disk",
                     "--cache-dir", tmp_path / "cache") == 0
    n_cached = len(list((tmp_path / "cache").iterdir()))
    assert n_cached == 4
    assert run_train(*common, "--output", tmp_path / "disk2", "--cache-latents", "disk",
                     "--cache-dir", tmp_path / "cache") == 0
    mem, none, disk, disk2 = (losses(tmp_path / d) for d in ("mem", "none", "disk", "disk2"))
    assert mem == pytest.approx(none, rel=1e-4) and disk == pytest.approx(mem, rel=1e-5) and disk2 == disk

    from imglora.config import TrainConfig
    from imglora.train.data import build_data

    cfg = TrainConfig(data=str(data), bucket_step=16)
    buckets = {e.path.stem: e.bucket for e in build_data(cfg, 32, log=lambda s: None).examples}
    # 32 px: area ≤ 32², sides multiples of 16 in [16, 64]; each image gets the closest aspect ratio.
    assert buckets == {"wide": (48, 16), "tall": (16, 48), "square": (32, 32), "big": (32, 32)}


def _run_cli(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "imglora.cli", "train", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _wait_for(path: Path, proc, timeout=120):
    t = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() - t < timeout
        time.sleep(0.05)


def test_kill_9_then_resume_ends_with_the_same_adapter(model_dir, shapes, tmp_path):
    common = ["--model", model_dir, "--data", shapes, "--steps", 12, "--save-every", 3, *FAST]
    straight = _run_cli([*common, "--output", tmp_path / "straight"])
    assert straight.wait() == 0, straight.stdout.read()

    out = tmp_path / "killed"
    proc = _run_cli([*common, "--output", out])
    _wait_for(out / "checkpoints" / "step-0000006" / "COMPLETE", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "lora.safetensors").exists()
    for _ in range(2):  # resume twice: once mid-run (killed again), once to the end
        proc = _run_cli([*common, "--output", out, "--resume", "latest"])
        if _ == 0:
            _wait_for(out / "checkpoints" / "step-0000009" / "COMPLETE", proc)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        else:
            assert proc.wait() == 0, proc.stdout.read()
    a = load_file(tmp_path / "straight" / "lora.safetensors")
    b = load_file(out / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((out / "checkpoints").glob("step-*"))) <= 3


def test_ctrl_c_saves_a_checkpoint_and_exits_130(model_dir, shapes, tmp_path):
    out = tmp_path / "int"
    proc = _run_cli(["--model", model_dir, "--data", shapes, "--steps", 100000, "--output", out, *FAST])
    log = out / "logs" / "train.jsonl"
    _wait_for(log, proc)
    while len(log.read_text().splitlines()) < 3:  # training has started
        assert proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    said = proc.stdout.read()
    hint = [line for line in said.splitlines() if "to continue:" in line]
    assert len(hint) == 1 and " imglora train --model" in hint[0] and hint[0].endswith("--resume latest")
    done = list((out / "checkpoints").glob("step-*/COMPLETE"))
    assert len(done) == 1
    # ...and it resumes from there.
    assert run_train("--model", model_dir, "--data", shapes, "--output", out, "--resume", "latest",
                     "--steps", int(done[0].parent.name.split("-")[1]) + 2, *FAST) == 0


def test_resume_refuses_a_different_run_and_missing_checkpoints(model_dir, shapes, tmp_path, capsys):
    out = tmp_path / "r"
    assert run_train("--model", model_dir, "--data", shapes, "--output", out, "--steps", 2, "--save-every", 1,
                     *FAST) == 0
    assert run_train("--model", model_dir, "--data", shapes, "--output", out, "--steps", 4, "--resume", "latest",
                     *train_flags(rank=8)) == 2
    assert "rank: 4 -> 8" in capsys.readouterr().err
    assert run_train("--model", model_dir, "--data", shapes, "--output", tmp_path / "new", "--resume", "latest",
                     *FAST) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    # A damaged newest checkpoint falls back to the previous one.
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    data = (newest / "adapter.safetensors").read_bytes()
    (newest / "adapter.safetensors").write_bytes(data[:-7])
    assert run_train("--model", model_dir, "--data", shapes, "--output", out, "--steps", 4, "--resume", "latest",
                     "--overwrite", *FAST) == 0
    assert "skipping damaged checkpoint" in capsys.readouterr().out


def test_nan_loss_stops_with_a_hint_and_writes_nothing(model_dir, shapes, tmp_path, capsys):
    out = tmp_path / "nan"
    assert run_train("--model", model_dir, "--data", shapes, "--output", out, "--steps", 50,
                     *train_flags(lr=10), "--alpha", "1e6", "--max-grad-norm", "0") == 2
    err = capsys.readouterr().err
    assert "loss became" in err and "lower --lr" in err
    assert not (out / "lora.safetensors").exists()


def test_bad_configs_and_datasets_are_one_line_errors(model_dir, shapes, tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text(f'data = "{shapes}"\nrnak = 4\n')
    assert main(["train", "--config", str(toml)]) == 2
    assert "unknown config key 'rnak'" in capsys.readouterr().err
    toml.write_text(f'data = "{shapes}"\nrank = "four"\n')
    assert main(["train", "--config", str(toml)]) == 2
    assert "'rank' must be int" in capsys.readouterr().err
    assert main(["train", "--model", str(model_dir), "--data", str(tmp_path / "missing"), "--output",
                 str(tmp_path / "never")]) == 2
    assert "no such data folder" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()

    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.png").write_bytes(b"not an image")
        (bad / f"{i}.txt").write_text("a caption")
    Image.new("RGB", (32, 32)).save(bad / "ok.png")
    (bad / "ok.txt").write_text("fine")
    assert run_train("--model", model_dir, "--data", bad, "--output", tmp_path / "o", "--steps", 1, *FAST) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("imglora: ") and "3 of the images are unusable" in last and "0.png" in last
    assert "Traceback" not in err


def test_toml_config_with_flag_overrides(model_dir, shapes, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(f'model = "{model_dir}"\ndata = "{shapes}"\nsteps = 3\nrank = 2\nresolution = 32\n'
                    f'bucket-step = 16\noutput = "{tmp_path / "out"}"\nsample_prompts = ["a red circle"]\n')
    assert main(["train", "--config", str(toml), "--rank", "3", "--sample-steps", "1"]) == 0
    saved = json.loads((tmp_path / "out" / "lora.json").read_text())
    assert saved["rank"] == 3 and saved["steps"] == 3
    from imglora.formats.lora_file import load_adapter

    adapter, _ = load_adapter(tmp_path / "out" / "lora.safetensors")
    assert json.loads(adapter.metadata["imglora.config"])["rank"] == 3
    assert set(adapter.ranks()) == {3}


@pytest.mark.slow
def test_two_processes_under_accelerate_train_in_sync(model_dir, shapes, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    # accelerate 1.x's `--cpu` launcher starts one process unless MPI is set up; `--multi_gpu` starts
    # them through torchrun, and on a machine without GPUs they talk over gloo on the CPU.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "imglora.cli", "train",
           "--device", "cpu", "--model", str(model_dir), "--data", str(shapes), "--output", str(out), "--steps", "4",
           "--save-every", "2", "--train-text-encoder", *FAST]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "processes in sync" in r.stdout + r.stderr
    assert (out / "lora.safetensors").is_file()
    assert len((out / "logs" / "train.jsonl").read_text().splitlines()) == 4  # one writer


def test_training_options_work_together(model_dir, shapes, tmp_path):
    """Checkpointing, accumulation, validation, schedule with warm-up, caption dropout and shuffling, flips."""
    out = tmp_path / "opts"
    assert run_train("--model", model_dir, "--data", shapes, "--output", out, "--steps", 6, "--gradient-checkpointing",
                     "--grad-accum", 2, "--val-count", 2, "--val-every", 3, "--lr-scheduler", "cosine",
                     "--warmup-steps", 2, "--caption-dropout", 0.3, "--shuffle-captions", "--keep-tokens", 1,
                     "--flip", "--train-text-encoder", "--text-encoder-lr", "1e-3", *FAST) == 0
    rows = [json.loads(line) for line in (out / "logs" / "train.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r]
    # Linear warm-up over 2 steps, then cosine from the peak towards 0 over the remaining 4.
    cosine = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert lrs == pytest.approx([3e-3 * f for f in [0.5, 1.0, *cosine]])
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(vals) == 3 and all(v > 0 for v in vals)  # steps 3, 6 and the end
    meta = json.loads((out / "lora.json").read_text())
    assert meta["gradient_checkpointing"] and meta["grad_accum"] == 2


def test_an_image_that_breaks_after_the_scan_is_skipped(model_dir, tmp_path, capsys):
    from imglora.config import TrainConfig
    from imglora.train.loop import Trainer

    data = tmp_path / "d"
    synth_shapes(data, 4, seed=5, size=32)
    cfg = TrainConfig(model=str(model_dir), data=str(data), output=str(tmp_path / "o"), steps=3, resolution=32,
                      bucket_step=16, rank=2, batch_size=4, cache_latents="none", workers=1)
    trainer = Trainer(cfg)  # the scan has passed every image
    (data / "00001.png").write_bytes(b"garbage")
    assert trainer.run().is_file()
    out = capsys.readouterr().out
    assert "warning: skipped" in out and "00001.png" in out and "changed after the scan" in out


def test_a_run_shorter_than_an_epoch_encodes_only_the_images_it_draws(model_dir, tmp_path):
    from imglora.config import TrainConfig
    from imglora.train.loop import Trainer

    data = tmp_path / "d"
    synth_shapes(data, 12, seed=5, size=32)
    cfg = TrainConfig(model=str(model_dir), data=str(data), output=str(tmp_path / "o"), steps=2, resolution=32,
                      bucket_step=16, rank=2, batch_size=2, workers=1)
    trainer = Trainer(cfg)
    drawn = {trainer.data.examples[i].path for g in range(2) for i in trainer.batches.indices(g)}
    assert len(drawn) == 4 and {key[0] for key in trainer.batches.latents.memory} == drawn
    assert trainer.run().is_file()  # every step found its latents


def test_an_image_that_breaks_before_caching_is_dropped_and_the_run_goes_on(model_dir, tmp_path, monkeypatch, capsys):
    import imglora.train.loop as loop
    from imglora.config import TrainConfig

    data = tmp_path / "d"
    synth_shapes(data, 12, seed=5, size=32)
    scan = loop.build_data

    def scan_then_break(*args, **kwargs):  # the image passes the scan, then breaks before it is encoded
        found = scan(*args, **kwargs)
        (data / "00003.png").write_bytes(b"garbage")
        return found

    monkeypatch.setattr(loop, "build_data", scan_then_break)
    cfg = TrainConfig(model=str(model_dir), data=str(data), output=str(tmp_path / "o"), steps=20, resolution=32,
                      bucket_step=16, rank=2, batch_size=2, workers=1)
    trainer = loop.Trainer(cfg)
    assert len(trainer.data.examples) == 11 and not any(p.name == "00003.png" for p, *_ in trainer.batches.latents.memory)
    assert trainer.run().is_file()
    assert "00003.png" in capsys.readouterr().out

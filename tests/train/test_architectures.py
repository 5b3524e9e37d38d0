"""Training on each base architecture (SDXL micro-conditioning, SD2 v-prediction), prior preservation,
and model files that must be refused."""

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file

from helpers import train_flags

from imglora.cli import main
from imglora.synthetic.shapes import synth_shapes

FAST = train_flags(batch_size=2)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    synth_shapes(d, 6, seed=2, size=32)
    return d


def _model(make_pipe, kind, tmp_path):
    path = tmp_path / kind
    make_pipe(kind).save_pretrained(path)
    return path


def test_sdxl_trains_with_both_text_encoders_and_loads_in_diffusers(make_pipe, shapes, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    model = _model(make_pipe, "sdxl", tmp_path)
    out = tmp_path / "xl"
    assert main(["train", "--model", str(model), "--data", str(shapes), "--output", str(out), "--steps", "4",
                 "--train-text-encoder", "--cache-latents", "none", *FAST]) == 0
    tensors = load_file(out / "lora.safetensors")
    assert any(k.startswith("lora_te1_") for k in tensors) and any(k.startswith("lora_te2_") for k in tensors)
    assert any(k.startswith("lora_unet_input_blocks_") or k.startswith("lora_unet_output_blocks_") for k in tensors)
    pipe = StableDiffusionXLPipeline.from_pretrained(model, local_files_only=True)
    pipe.load_lora_weights(str(out / "lora.safetensors"))
    peft_layers = [m for m in pipe.unet.modules() if hasattr(m, "lora_A") and m.lora_A]
    assert len(peft_layers) == sum(k.startswith("lora_unet") and k.endswith("lora_down.weight") for k in tensors)


def test_v_prediction_model_trains_on_velocity(make_pipe, shapes, tmp_path):
    model = _model(make_pipe, "sd2", tmp_path)
    out = tmp_path / "v"
    assert main(["train", "--model", str(model), "--data", str(shapes), "--output", str(out), "--steps", "3",
                 "--min-snr-gamma", "5", *FAST]) == 0
    from imglora.formats.lora_file import load_adapter

    adapter, _ = load_adapter(out / "lora.safetensors")
    assert adapter.metadata["modelspec.prediction_type"] == "v"
    assert adapter.metadata["ss_base_model_version"] == "sd_v2_v" and adapter.metadata["ss_v2"] == "True"


def test_prior_preservation_and_trigger_word(make_pipe, shapes, tmp_path):
    model = _model(make_pipe, "sd1", tmp_path)
    reg = tmp_path / "reg"
    synth_shapes(reg, 4, seed=9, size=32)
    inst = tmp_path / "10_zorbly"  # a kohya repeat folder: 10 repeats
    synth_shapes(inst, 2, seed=3, size=32, shapes=("star",), words={"star": "zorbly"})
    out = tmp_path / "pp"
    assert main(["train", "--model", str(model), "--data", str(inst), "--reg-data", str(reg), "--prior-loss-weight",
                 "0.5", "--trigger", "sks", "--output", str(out), "--steps", "2", *FAST]) == 0
    config = json.loads((out / "lora.json").read_text())
    assert config["prior_loss_weight"] == 0.5
    from imglora.config import TrainConfig
    from imglora.train.data import build_data

    data = build_data(TrainConfig(data=str(inst), reg_data=str(reg), prior_loss_weight=0.5, trigger="sks",
                                  bucket_step=16), 32, log=lambda s: None)
    inst_examples = [e for e in data.examples if e.weight == 1.0]
    assert len(inst_examples) == 20 and all(e.caption.startswith("sks ") for e in inst_examples)
    assert sorted(e.weight for e in data.examples if e.weight != 1.0) == [0.5] * 4


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('IMGLORA_SENTINEL', '/tmp/imglora-pwned')}",))


def test_pickled_checkpoints_never_run_code(shapes, tmp_path, monkeypatch, capsys):
    sentinel = tmp_path / "pwned"
    monkeypatch.setenv("IMGLORA_SENTINEL", str(sentinel))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # RELIABILITY.md F7: even with this set
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(pickle.dumps({"state_dict": Payload()}))
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert main(["train", "--model", str(ckpt), "--model-config", str(cfg_dir), "--data", str(shapes),
                 "--output", str(tmp_path / "o")]) == 2
    assert "refused to load the pickle" in capsys.readouterr().err
    assert not sentinel.exists()
    single = tmp_path / "model.safetensors"
    torch.save({}, single)
    assert main(["generate", "--model", str(single), "--prompt", "x"]) == 2
    assert "needs its pipeline config" in capsys.readouterr().err


def test_int8_base_trains_a_float32_adapter(make_pipe, shapes, tmp_path):
    pytest.importorskip("torchao")
    model = _model(make_pipe, "sd1", tmp_path)
    out = tmp_path / "q"
    assert main(["train", "--model", str(model), "--data", str(shapes), "--output", str(out), "--steps", "3",
                 "--quantize-base", "int8", *FAST]) == 0
    tensors = load_file(out / "lora.safetensors")
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_up" in k)  # B moved off zero


def test_compiled_unet_trains_the_same_adapter(make_pipe, shapes, tmp_path):
    """--compile (torch.compile, inductor) changes how the UNet runs, not what it computes."""
    model = _model(make_pipe, "sd1", tmp_path)
    files = {}
    for flag in ("--no-compile", "--compile"):
        out = tmp_path / flag
        assert main(["train", "--model", str(model), "--data", str(shapes), "--output", str(out), "--steps", "3",
                     flag, *FAST]) == 0
        files[flag] = load_file(out / "lora.safetensors")
    assert files["--compile"].keys() == files["--no-compile"].keys()
    # What separates the two: Adam moves every element that has a gradient by about lr (3e-3) per step,
    # so an adapter the compiled graph trains wrongly (not applied, a wrong gradient) is off by ~1e-3 in
    # most elements, while inductor's reassociated float sums leave differences of ~1e-6 (2.3e-6 seen).
    for key, eager in files["--no-compile"].items():
        torch.testing.assert_close(files["--compile"][key], eager, rtol=1e-4, atol=5e-5)
    assert all(t.abs().max() > 1e-3 for k, t in files["--no-compile"].items() if "lora_up" in k)

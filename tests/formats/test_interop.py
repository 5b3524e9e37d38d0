"""Files round-trip with diffusers+peft, the independent reference: both directions, SD1, SD2 and SDXL."""

import logging

import numpy as np
from helpers import random_adapters
import pytest
import torch

from imglora.formats.lora_file import load_adapter, save_adapter
from imglora.formats.metadata import build_metadata
from imglora.lora.adapters import Adapters
from imglora.pipeline import attach, model_of

ARGS = dict(prompt="a red circle", num_inference_steps=2, guidance_scale=3.0, width=32, height=32, output_type="np")


def run(pipe, seed=0):
    return pipe(**ARGS, generator=torch.Generator("cpu").manual_seed(seed)).images


@pytest.fixture
def strict_diffusers_logs(caplog):
    """diffusers only *warns* about unexpected or unused LoRA keys; these tests fail on them."""
    import diffusers

    diffusers.utils.logging.enable_propagation()
    caplog.set_level(logging.WARNING)
    yield caplog
    bad = [r.getMessage() for r in caplog.records
           if "unexpected keys" in r.getMessage() or "No LoRA keys associated" in r.getMessage()
           or "were not used" in r.getMessage()]
    diffusers.utils.logging.disable_propagation()
    assert not bad, bad


def trained_adapter(pipe, preset, text_encoder, rank=4, alpha=2.0, seed=0):
    return random_adapters(pipe, preset, text_encoder, rank=rank, alpha=alpha, seed=seed, scale=0.3, name="mine",
                           conv_rank=2, conv_alpha=1.0)


CASES = [("sd1", "cross-attn", True), ("sd1", "transformer", False), ("sd1", "conv", True),
         ("sd2", "attn", True), ("sdxl", "cross-attn", True), ("sdxl", "transformer", True), ("sdxl", "conv", False)]


@pytest.mark.parametrize("kind,preset,te", CASES)
def test_our_kohya_file_loads_in_diffusers(make_pipe, tmp_path, strict_diffusers_logs, kind, preset, te):
    ours, reference = make_pipe(kind), make_pipe(kind)
    base = run(reference)
    adapters = trained_adapter(ours, preset, te)
    adapter = adapters.export("mine")
    model = model_of(ours)
    adapter.arch, prediction = model.arch, model.prediction
    path = tmp_path / "mine.safetensors"
    save_adapter(path, adapter, metadata=build_metadata(adapter, adapter.arch, "mine", prediction))
    adapters.set_weight("mine", 0.8)
    expected = run(ours)

    reference.load_lora_weights(str(path), adapter_name="mine")
    reference.set_adapters(["mine"], adapter_weights=[0.8])
    got = run(reference)
    assert np.abs(expected - base).max() > 1e-3  # the adapter matters
    assert np.allclose(expected, got, atol=2e-4), np.abs(expected - got).max()
    # diffusers built the same modules we exported, no more, no fewer.
    peft_modules = {n for n, m in reference.unet.named_modules() if hasattr(m, "lora_A") and "mine" in m.lora_A}
    assert len(peft_modules) == sum(k.startswith("unet.") for k in adapter.modules)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_our_peft_file_loads_in_diffusers(make_pipe, tmp_path, strict_diffusers_logs, kind):
    ours, reference = make_pipe(kind), make_pipe(kind)
    adapters = trained_adapter(ours, "attn", True, rank=4, alpha=8.0)
    adapter = adapters.export("mine")
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_adapter(path, adapter, fmt="peft")
    expected = run(ours)
    reference.load_lora_weights(str(path), adapter_name="mine")
    assert np.allclose(expected, run(reference), atol=2e-4)


def _peft_pipe(make_pipe, kind, alpha, seed=1):
    from peft import LoraConfig

    pipe = make_pipe(kind)
    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=alpha, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    pipe.text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=alpha, init_lora_weights=False,
                                             target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    return pipe


def _check_imglora_matches(make_pipe, path, expected, kind="sd1"):
    ours = make_pipe(kind)
    attach(model_of(ours), Adapters(ours), path)
    got = run(ours)
    assert np.allclose(expected, got, atol=2e-4), np.abs(expected - got).max()


def test_files_written_by_diffusers_peft_load_in_imglora(make_pipe, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    writer = _peft_pipe(make_pipe, "sd1", alpha=8)
    expected = run(writer)  # the in-memory peft model, alpha 8 on rank 4
    meta = {k: (list(v) if isinstance(v, set) else v) for k, v in writer.unet.peft_config["default"].to_dict().items()}
    te_meta = {k: (list(v) if isinstance(v, set) else v)
               for k, v in writer.text_encoder.peft_config["default"].to_dict().items()}
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(writer.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(writer.text_encoder),
        unet_lora_adapter_metadata=meta, text_encoder_lora_adapter_metadata=te_meta)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    assert load_adapter(path)[1] == "peft"
    _check_imglora_matches(make_pipe, path, expected)


def test_files_of_the_diffusers_example_scripts_and_old_attn_procs_load(make_pipe, tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    writer = _peft_pipe(make_pipe, "sd1", alpha=4)  # the example scripts use lora_alpha = r
    expected = run(writer)
    unet_sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(writer.unet))
    te_sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(writer.text_encoder))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    assert load_adapter(path)[1] == "diffusers"
    _check_imglora_matches(make_pipe, path, expected)

    # The pre-PEFT attn-procs layout of the same weights (FORMATS.md §1.1, O).
    old = {}
    for key, t in {**{f"unet.{k}": v for k, v in unet_sd.items()},
                   **{f"text_encoder.{k}": v for k, v in te_sd.items()}}.items():
        key = key.replace(".lora_linear_layer.", ".lora.")
        for proj, new in (("to_out.0.lora", "processor.to_out_lora"), ("to_q.lora", "processor.to_q_lora"),
                          ("to_k.lora", "processor.to_k_lora"), ("to_v.lora", "processor.to_v_lora"),
                          ("q_proj.lora", "to_q_lora"), ("k_proj.lora", "to_k_lora"),
                          ("v_proj.lora", "to_v_lora"), ("out_proj.lora", "to_out_lora")):
            key = key.replace(f".{proj}.", f".{new}.")
        old[key] = t.contiguous()
    save_file(old, tmp_path / "old.safetensors")
    assert load_adapter(tmp_path / "old.safetensors")[1] == "attn-procs"
    _check_imglora_matches(make_pipe, tmp_path / "old.safetensors", expected)


def test_kohya_file_from_diffusers_converter_loads(make_pipe, tmp_path):
    """diffusers' own convert_state_dict_to_kohya (lora_te1_ even for SD1, integer alpha)."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    writer = _peft_pipe(make_pipe, "sd1", alpha=4)
    expected = run(writer)
    sd = {f"unet.{k}": v for k, v in get_peft_model_state_dict(writer.unet).items()}
    sd.update({f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(writer.text_encoder).items()})
    save_file({k: v.contiguous() for k, v in convert_state_dict_to_kohya(sd).items()}, tmp_path / "k.safetensors")
    assert load_adapter(tmp_path / "k.safetensors")[1] == "kohya"
    _check_imglora_matches(make_pipe, tmp_path / "k.safetensors", expected)

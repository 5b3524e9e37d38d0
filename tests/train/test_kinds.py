"""Training LoHa, LoKr and DoRA: the files are what LyCORIS writes (its own loader uses every key and gives
the same output as imglora), the metadata names the kind, and a resumed run ends bit-identical."""

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from helpers import train_flags

from imglora.cli import main
from imglora.formats.lora_file import load_adapter
from imglora.lora.adapters import Adapters
from imglora.synthetic.shapes import synth_shapes


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    synth_shapes(d, 8, seed=2, size=32)
    return d


def _pipe(model_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True, safety_checker=None)


def _unet_out(pipe):
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 8, 32, generator=g)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([50, 700]), e).sample


KINDS = {"loha": ([], "loha"), "lokr": (["--lokr-factor", "2"], "lokr"),
         "lokr-full": (["--lokr-full-matrix"], "lokr"), "dora": ([], "locon")}


@pytest.mark.parametrize("case", KINDS)
def test_a_trained_kind_is_a_lycoris_file_lycoris_reads_whole(model_dir, data, tmp_path, case):
    from lycoris.config import PRESET
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    flags, algo = KINDS[case]
    out = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--steps", "6",
                 "--adapter", case.split("-")[0], *flags, "--targets", "conv",
                 *train_flags(lr=1e-2)]) == 0
    path = out / "lora.safetensors"
    meta = load_adapter(path)[0].metadata
    assert meta["ss_network_module"] == "lycoris.kohya"
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == algo and (args.get("dora_wd") == "True") == (case == "dora")
    tensors = load_file(path)
    pipe, ref = _pipe(model_dir), _pipe(model_dir)
    base = _unet_out(pipe)
    adapter, _ = load_adapter(path, pipe.unet.config.layers_per_block)
    Adapters(pipe).load("x", adapter)
    # LyCORIS's loader on the same file (its preset first: on a diffusers UNet its default set trips over
    # a duplicated time_embedding name).
    LycorisNetworkKohya.apply_preset(PRESET["attn-mlp"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net, _ = create_network_from_weights(1.0, str(path), None, ref.text_encoder, ref.unet, weights_sd=tensors)
    assert len(net.unet_loras) == len(adapter.modules)  # every module of the file, by LyCORIS's own matching
    net.apply_to(ref.text_encoder, ref.unet, True, True)
    want, got = _unet_out(ref), _unet_out(pipe)
    assert (want - base).abs().max() > 1e-3  # training moved it
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_resumed_loha_run_ends_bit_identical(model_dir, data, tmp_path):
    common = ["--model", str(model_dir), "--data", str(data), "--adapter", "loha", "--targets", "attn",
              *train_flags()]
    assert main(["train", *common, "--output", str(tmp_path / "straight"), "--steps", "4"]) == 0
    assert main(["train", *common, "--output", str(tmp_path / "split"), "--steps", "2", "--save-every", "1"]) == 0
    assert main(["train", *common, "--output", str(tmp_path / "split"), "--steps", "4", "--resume", "latest",
                 "--overwrite"]) == 0
    a, b = load_file(tmp_path / "straight" / "lora.safetensors"), load_file(tmp_path / "split" / "lora.safetensors")
    assert a.keys() == b.keys() and any(k.endswith("hada_w1_a") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kind_options_are_checked(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path), "--adapter", "loha", "--lora-dropout", "0.1"]) == 2
    assert "--lora-dropout works with --adapter lora, not loha" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path), "--lokr-factor", "4"]) == 2
    assert "need --adapter lokr" in capsys.readouterr().err


def test_new_kinds_start_exactly_at_the_base(model_dir):
    """B = 0 for LoRA; for the others one factor is zero, and DoRA's magnitude is the base weight's norm."""
    pipe = _pipe(model_dir)
    base = _unet_out(pipe)
    for kind in ("loha", "lokr", "dora"):
        p = copy.deepcopy(pipe)
        adapters = Adapters(p)
        adapters.create(kind, adapters.targets("conv"), rank=2, kind=kind)
        torch.testing.assert_close(_unet_out(p), base, rtol=0, atol=1e-6 if kind == "dora" else 0)

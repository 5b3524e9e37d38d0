"""Block weights in LBW's layout (hako-mikan/sd-webui-lora-block-weight): which block each module is in, the
presets, and what a block weight does at run time, merged and merged into a file."""

import pytest
import torch

from helpers import random_adapters
from imglora.formats.kohya import diffusers_to_sgm
from imglora.lora.blocks import BLOCKS26, LISTS, PRESETS, block_of, block_weights
from imglora.lora.state import Blend
from imglora.lora.tags import blend_of, parse_options
from imglora.ops.merge import blend_parts, concatenate

# LBW's rule, written out from its source (scripts/lora_block_weight.py: BLOCKS and ratiodealer): a module's
# A1111 name (diffusion_model_ + the original UNet path with '_') is in block i when it contains BLOCKS[i];
# the last match wins; text-encoder names (encoder / embedders / transformer_resblocks) are BASE; no match: 1.
LBW_BLOCKS = (["encoder"] + [f"diffusion_model_input_blocks_{i}_" for i in range(12)] + ["diffusion_model_middle_block_"]
              + [f"diffusion_model_output_blocks_{i}_" for i in range(12)] + ["embedders", "transformer_resblocks"])


def lbw_block(a1111_name: str) -> str | None:
    found = None
    for i, needle in enumerate(LBW_BLOCKS):
        if needle in a1111_name:
            found = BLOCKS26[0 if i >= 26 else i]
    return found


def _unet_keys(kind: str, preset: str) -> list[str]:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from benchmarks.models import SD15_UNET, SDXL_UNET
    from imglora.lora.inject import unet_targets

    with init_empty_weights():
        unet = UNet2DConditionModel(**(SD15_UNET if kind == "sd15" else SDXL_UNET))
    return [f"unet.{p}" for p in unet_targets(unet, preset)]


@pytest.mark.parametrize("kind, lora_list, locon_list", [("sd15", 17, 26), ("sdxl", 12, 20)])
def test_every_module_is_in_the_block_lbw_puts_it_in(kind, lora_list, locon_list):
    """On the real SD 1.5 and SDXL UNets: imglora's block of every LoRA and LoCon module equals LBW's, and the
    modules lie exactly in the blocks of LBW's lists for that model (17/26 for SD 1.x, 12/20 for SDXL)."""
    for preset, size in (("transformer", lora_list), ("conv", locon_list)):
        keys = _unet_keys(kind, preset)
        blocks = set()
        for key in keys:
            name = "diffusion_model_" + diffusers_to_sgm(key.removeprefix("unet.")).replace(".", "_")
            assert block_of(key) == lbw_block(name), key
            blocks.add(block_of(key))
        # Every block of the list holds modules (conv_in, IN00, is not among kohya's LoCon targets), none else.
        assert blocks <= set(LISTS[size]) and set(LISTS[size]) - blocks <= {"BASE", "IN00"}, (preset, sorted(blocks))
    assert block_of("text_encoder.text_model.encoder.layers.0.self_attn.q_proj") == "BASE"
    assert block_of("text_encoder_2.text_model.encoder.layers.3.mlp.fc1") == "BASE"
    assert block_of("unet.time_embedding.linear_1") is None  # LBW: in no block, weight 1


def test_presets_and_lists_give_lbws_26_values():
    ind = dict(zip(BLOCKS26, block_weights("IND")))
    assert [b for b, w in ind.items() if w] == ["BASE", "IN05", "IN07", "IN08"]
    assert block_weights("ALL") == tuple(1.0 if b in LISTS[17] else 0.0 for b in BLOCKS26)  # LBW's to26
    assert set(PRESETS) >= {"NONE", "ALL", "INS", "IND", "INALL", "MIDD", "OUTD", "OUTS", "OUTALL"}
    sdxl = block_weights("1,0,0,0,0,1,0,0,0,0,0,2")
    assert dict(zip(BLOCKS26, sdxl))["M00"] == 1 and dict(zip(BLOCKS26, sdxl))["OUT05"] == 2
    assert block_weights(",".join(str(i) for i in range(26))) == tuple(float(i) for i in range(26))
    for bad in ("1,2,3", "FOO", "1,x," + "1," * 15):
        with pytest.raises(ValueError):
            block_weights(bad)


def test_prompt_options_parse_as_a1111_and_its_extensions_read_them():
    o = parse_options(["0.8", "lbw=IND", "stop=10"], 10)
    assert (o.weight, o.te, o.blocks, o.schedule.stop) == (0.8, None, block_weights("IND"), 10)
    o = parse_options(["1", "0.5", "start=2"], 10)  # A1111: te first, then unet
    assert (o.te, o.weight, o.schedule.start) == (1.0, 0.5, 2)
    o = parse_options(["te=0.3", "unet=0@0,1@0.5", "step=5-10"], 10)
    assert o.te == 0.3 and o.schedule.keys == ((0.0, 0.0), (1.0, 0.5)) and (o.schedule.start, o.schedule.stop) == (5, 10)
    assert parse_options(["1", "OUTALL"], 10).blocks == block_weights("OUTALL")  # LBW's positional form
    for bad in (["lbw=1,2"], ["dyn=4"], ["start=x"], ["1", "2", "3"], ["99"]):
        with pytest.raises(ValueError):
            parse_options(bad, 10)
    blend = blend_of({"a": parse_options(["0.5", "0.7", "lbw=IND", "stop=4"], 10)})
    assert blend.tags() == "<lora:a:0.5:0.7:lbw=IND:stop=4>"


def test_block_weight_zero_leaves_a_block_at_the_base_bit_for_bit(make_pipe):
    pipe = make_pipe("sd1")
    adapters = random_adapters(pipe, "conv", text_encoder=True, scale=0.3)
    weights = tuple(0.0 if b in ("BASE", "IN01", "M00") else 0.5 for b in BLOCKS26)
    adapters.apply(Blend({"x": 1.0}, blocks={"x": weights}))
    lpb = pipe.unet.config.layers_per_block
    zero = [k for k in adapters.layers if block_of(k, lpb) in ("BASE", "IN01", "M00")]
    assert zero and any(k.startswith("text_encoder") for k in zero)
    g = torch.Generator().manual_seed(0)
    for key, layer in adapters.layers.items():
        shape = (2, layer.base.in_channels, 4, 4) if layer.is_conv else (2, layer.base.in_features)
        x = torch.randn(shape, generator=g)
        with torch.no_grad():
            out, base = layer(x), layer.base(x)
        if key in zero:
            assert torch.equal(out, base), key
        else:
            assert not torch.equal(out, base), key
            want = layer.weights["x"]
            assert want == pytest.approx(0.5 if block_of(key, lpb) else 1.0)  # outside every block: 1


def test_block_weights_merged_and_in_a_file_equal_block_weights_at_run_time(make_pipe):
    from test_lycoris import outputs

    pipe = make_pipe("sd1")
    adapters = random_adapters(pipe, "conv", text_encoder=True, scale=0.3)
    blend = blend_of({"x": parse_options(["0.8", "1.2", "lbw=" + ",".join(f"{(i % 5) / 4:g}" for i in range(26))], 10)})
    adapters.apply(blend)
    live = outputs(pipe)
    adapters.merge()
    for a, b in zip(live, outputs(pipe)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    adapters.unmerge()
    # The blend as one file: its modules grouped by their weight, concatenated, loaded at weight 1.
    exported = adapters.export("x")
    merged = concatenate(blend_parts(exported, blend, "x", pipe.unet.config.layers_per_block))
    fresh = make_pipe("sd1")
    from imglora.lora.adapters import Adapters

    Adapters(fresh).load("m", merged)
    for a, b in zip(live, outputs(fresh)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="cannot be merged"):
        blend_parts(exported, blend_of({"x": parse_options(["1", "stop=3"], 10)}), "x")

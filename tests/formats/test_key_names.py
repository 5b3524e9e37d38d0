"""Key names checked against fixed facts, not against a reference running on the same libraries.

tests/formats/data/kohya_keys/ holds the module names kohya sd-scripts itself writes (made by running
its own network code on SD 1.5, SD 2.1 and SDXL; README.md there). The other tests here build files
with the names other tools write (kohya's text-encoder names, ComfyUI's `diffusion_model.` names) by
hand from FORMATS.md and check that every key is used and the merged weights are the file's.
"""

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from imglora.cli import main
from imglora.formats import kohya
from imglora.formats.clients import client_misses
from imglora.formats.inspect import describe
from imglora.formats.lora_file import load_adapter, save_adapter
from imglora.lora.adapters import Adapters
from imglora.lora.inject import find
from imglora.lora.modules import LoraModule
from imglora.lora.state import Adapter
from imglora.pipeline import attach, model_of

KOHYA = Path(__file__).parent / "data" / "kohya_keys"


def kohya_names(name: str) -> set[str]:
    return set((KOHYA / f"{name}.txt").read_text().split())


# Our presets as subsets of kohya's lists (kohya's default is every Linear/1x1 conv of the transformer
# blocks; its conv_dim adds the ResNet and sampler blocks; its text encoder has attention and MLP).
PRESET_FILTERS = {
    "cross-attn": re.compile(r"_attn2_to_(q|k|v|out_0)$"),
    "attn": re.compile(r"_attn[12]_to_(q|k|v|out_0)$"),
    "transformer": re.compile(r"."),
}


def expected_names(arch: str, preset: str, te: bool, mlp: bool) -> set[str]:
    unet = kohya_names(f"{arch}_unet")
    names = unet | kohya_names(f"{arch}_unet_conv") if preset == "conv" else \
        {n for n in unet if PRESET_FILTERS[preset].search(n)}
    if te:
        for part in ("te1", "te2") if arch == "sdxl" else ("te",):
            names |= {n for n in kohya_names(f"{arch}_{part}") if mlp or "_mlp_" not in n}
    return names


def full_size_components(arch: str) -> dict:
    """The real SD 1.5 / SD 2.1 / SDXL modules on the meta device: names and shapes, no memory."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from benchmarks.models import CLIP_BIGG, CLIP_H, CLIP_L, SD2_UNET, SD15_UNET, SDXL_UNET

    with torch.device("meta"):
        if arch == "sdxl":
            return {"unet": UNet2DConditionModel(**SDXL_UNET),
                    "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                    "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG))}
        unet, clip = (SD15_UNET, CLIP_L) if arch == "sd1" else (SD2_UNET, CLIP_H)
        return {"unet": UNet2DConditionModel(**unet), "text_encoder": CLIPTextModel(CLIPTextConfig(**clip))}


@pytest.fixture(scope="module")
def full_size():
    return {arch: full_size_components(arch) for arch in ("sd1", "sd2", "sdxl")}


CASES = [(arch, preset, te, mlp) for arch in ("sd1", "sd2", "sdxl")
         for preset, te, mlp in (("cross-attn", True, False), ("attn", False, False), ("transformer", True, True),
                                 ("conv", True, False), ("cross-attn", True, True))]


@pytest.mark.parametrize("arch,preset,te,mlp", CASES)
def test_exported_names_equal_the_names_kohya_writes(full_size, arch, preset, te, mlp):
    adapters = Adapters(full_size[arch])
    keys = adapters.targets(preset, text_encoder=te, te_mlp=mlp)
    tiny = LoraModule(torch.zeros(1, 1), torch.zeros(1, 1), 1.0)  # names only
    tensors = kohya.to_kohya(Adapter({k: tiny for k in keys}, arch=arch), sdxl=arch == "sdxl")
    names = {k.split(".", 1)[0] for k in tensors}
    want = expected_names(arch, preset, te, mlp)
    assert names == want, (sorted(names - want)[:5], sorted(want - names)[:5])
    assert {k.split(".", 1)[1] for k in tensors} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert client_misses(list(tensors), arch) == []
    # ...and kohya's names read back onto the same modules.
    modules = kohya.from_kohya({f"{n}.{s}": tiny.A for n in want for s in ("lora_down.weight", "lora_up.weight")},
                               sdxl=arch == "sdxl")
    assert set(modules) == set(keys)


def _kohya_te_file(pipe, prefix_for, seed=0):
    """Text-encoder keys as kohya and every client write them: lora_te_text_model_encoder_layers_N_..."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for component, prefix in prefix_for.items():
        te = getattr(pipe, component)
        for i in range(te.config.num_hidden_layers):
            for kind, (out, inp) in {"self_attn_q_proj": (te.config.hidden_size,) * 2,
                                     "self_attn_k_proj": (te.config.hidden_size,) * 2,
                                     "self_attn_v_proj": (te.config.hidden_size,) * 2,
                                     "self_attn_out_proj": (te.config.hidden_size,) * 2,
                                     "mlp_fc1": (te.config.intermediate_size, te.config.hidden_size),
                                     "mlp_fc2": (te.config.hidden_size, te.config.intermediate_size)}.items():
                name = f"{prefix}_text_model_encoder_layers_{i}_{kind}"
                tensors[f"{name}.lora_down.weight"] = torch.randn(2, inp, generator=g)
                tensors[f"{name}.lora_up.weight"] = torch.randn(out, 2, generator=g)
                tensors[f"{name}.alpha"] = torch.tensor(1.0)
    return tensors


@pytest.mark.parametrize("kind,prefix_for", [("sd1", {"text_encoder": "lora_te"}),
                                             ("sdxl", {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"})])
def test_kohya_text_encoder_names_load_with_every_key_used(make_pipe, tmp_path, kind, prefix_for):
    pipe = make_pipe(kind)
    tensors = _kohya_te_file(pipe, prefix_for)
    save_file(tensors, tmp_path / "kohya.safetensors")
    before = {c: {n: p.detach().clone() for n, p in getattr(pipe, c).named_parameters()} for c in prefix_for}
    adapters = Adapters(pipe)
    attach(model_of(pipe), adapters, tmp_path / "kohya.safetensors", weight=0.5)
    assert len(adapters.layers) == len(tensors) // 3  # every module of the file found its layer
    adapters.merge()
    for component, prefix in prefix_for.items():
        te = getattr(pipe, component)
        for i in range(te.config.num_hidden_layers):
            for kind_, path in (("self_attn_q_proj", "self_attn.q_proj"), ("self_attn_out_proj", "self_attn.out_proj"),
                                ("mlp_fc1", "mlp.fc1"), ("mlp_fc2", "mlp.fc2")):
                name = f"{prefix}_text_model_encoder_layers_{i}_{kind_}"
                layer = find(te, f"text_model.encoder.layers.{i}.{path}")
                live = [n for n in before[component] if n.endswith(f"layers.{i}.{path}.weight")]
                w0 = before[component][live[0]]
                delta = 0.5 * (1.0 / 2) * tensors[f"{name}.lora_up.weight"] @ tensors[f"{name}.lora_down.weight"]
                torch.testing.assert_close(layer.base.weight, w0 + delta, rtol=1e-5, atol=1e-6)


def test_files_with_the_old_transformers5_text_encoder_names_still_load(make_pipe, tmp_path):
    """imglora before this fix wrote lora_te_encoder_layers_N_... under transformers 5: still readable."""
    pipe = make_pipe("sd1")
    tensors = {k.replace("lora_te_text_model_", "lora_te_"): v
               for k, v in _kohya_te_file(pipe, {"text_encoder": "lora_te"}).items()}
    save_file(tensors, tmp_path / "old.safetensors")
    adapters = Adapters(pipe)
    attach(model_of(pipe), adapters, tmp_path / "old.safetensors")
    assert len(adapters.layers) == len(tensors) // 3
    warnings = describe(tmp_path / "old.safetensors")["warnings"]
    assert any("lora_te_encoder_layers_0_" in w and "text-encoder" in w for w in warnings), warnings
    # Re-exported, they get the names every client reads.
    save_adapter(tmp_path / "new.safetensors", load_adapter(tmp_path / "old.safetensors")[0])
    assert describe(tmp_path / "new.safetensors")["warnings"] == []
    assert all(k.startswith("lora_te_text_model_encoder_layers_") for k in load_file(tmp_path / "new.safetensors"))


# ComfyUI's writers use the original (LDM/sgm) module paths with dots (FORMATS.md §1.3-1.4).
COMFY_FIXED = {
    "sdxl": {
        "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_q":
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q",
        "diffusion_model.output_blocks.0.1.transformer_blocks.9.attn1.to_out.0":
            "unet.up_blocks.0.attentions.0.transformer_blocks.9.attn1.to_out.0",
        "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v":
            "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
        "diffusion_model.input_blocks.1.0.in_layers.2": "unet.down_blocks.0.resnets.0.conv1",
        "diffusion_model.input_blocks.3.0.op": "unet.down_blocks.0.downsamplers.0.conv",
        "diffusion_model.output_blocks.2.2.conv": "unet.up_blocks.0.upsamplers.0.conv",
        "diffusion_model.label_emb.0.0": "unet.add_embedding.linear_1",
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj":
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        "text_encoders.clip_g.transformer.text_model.encoder.layers.31.mlp.fc2":
            "text_encoder_2.text_model.encoder.layers.31.mlp.fc2",
    },
    "sd1": {
        "diffusion_model.input_blocks.1.1.proj_in": "unet.down_blocks.0.attentions.0.proj_in",
        "diffusion_model.input_blocks.8.1.transformer_blocks.0.ff.net.2":
            "unet.down_blocks.2.attentions.1.transformer_blocks.0.ff.net.2",
        "diffusion_model.output_blocks.2.1.conv": "unet.up_blocks.0.upsamplers.0.conv",
        "diffusion_model.output_blocks.5.2.conv": "unet.up_blocks.1.upsamplers.0.conv",
        "diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_out.0":
            "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0",
        "diffusion_model.output_blocks.3.0.skip_connection": "unet.up_blocks.1.resnets.0.conv_shortcut",
    },
}


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_comfyui_module_paths_map_onto_the_real_modules(full_size, arch):
    tensors = {}
    for name in COMFY_FIXED[arch]:
        tensors[f"{name}.lora_up.weight"] = torch.zeros(1, 1)
        tensors[f"{name}.lora_down.weight"] = torch.zeros(1, 1)
    modules = kohya.from_comfy(tensors)
    assert {k: k for k in modules} == {v: v for v in COMFY_FIXED[arch].values()}
    for key in modules:
        component, path = key.split(".", 1)
        find(full_size[arch][component], path)  # exists in the real architecture


def test_comfyui_file_loads_with_every_key_used_and_exact_weights(make_pipe, tmp_path):
    """A file as ComfyUI's LoRA extractor writes it (no alpha: scale 1), on the tiny SDXL (layers_per_block 2)."""
    pipe = make_pipe("sdxl")
    g = torch.Generator().manual_seed(0)
    unet = pipe.unet
    expected, tensors = {}, {}
    # input_blocks.{3i+j+1}.1 <-> down_blocks.i.attentions.j; output_blocks.{3i+j}.1 <-> up_blocks.i.attentions.j
    pairs = [(f"input_blocks.{3 * 1 + j + 1}.1", f"down_blocks.1.attentions.{j}") for j in range(2)]
    pairs += [(f"output_blocks.{j}.1", f"up_blocks.0.attentions.{j}") for j in range(3)]
    pairs += [("middle_block.1", "mid_block.attentions.0")]
    for ldm, diff in pairs:
        for t in range(2):
            for proj in ("attn1.to_q", "attn2.to_k", "attn2.to_out.0", "ff.net.2"):
                base = unet.get_submodule(f"{diff}.transformer_blocks.{t}.{proj}")
                out, inp = base.weight.shape
                down, up = torch.randn(2, inp, generator=g), torch.randn(out, 2, generator=g)
                name = f"diffusion_model.{ldm}.transformer_blocks.{t}.{proj}"
                tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
                expected[f"{diff}.transformer_blocks.{t}.{proj}"] = base.weight.detach() + up @ down
    save_file(tensors, tmp_path / "ComfyUI_extracted_lora_00001_.safetensors")
    assert load_adapter(tmp_path / "ComfyUI_extracted_lora_00001_.safetensors")[1] == "comfyui"
    adapters = Adapters(pipe)
    attach(model_of(pipe), adapters, tmp_path / "ComfyUI_extracted_lora_00001_.safetensors")
    assert len(adapters.layers) == len(expected)
    adapters.merge()
    for path, w in expected.items():
        torch.testing.assert_close(unet.get_submodule(path).base.weight, w, rtol=1e-5, atol=1e-6)


def test_client_naming_rules_flag_what_clients_ignore():
    good = ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q.alpha",
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"]
    assert client_misses(good, "sdxl") == []
    bad = client_misses(["lora_te_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                         "lora_unet_somewhere_else.lora_down.weight",
                         "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                         "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], "sdxl")
    assert len(bad) == 4, bad  # TE name, UNet name, lora_te_ on SDXL, TE2 attention without k/v/out


def test_inspect_cli_shows_the_naming_warning(make_pipe, tmp_path, capsys):
    pipe = make_pipe("sd1")
    tensors = {k.replace("lora_te_text_model_", "lora_te_"): v
               for k, v in _kohya_te_file(pipe, {"text_encoder": "lora_te"}).items()}
    save_file(tensors, tmp_path / "old.safetensors")
    assert main(["inspect", str(tmp_path / "old.safetensors")]) == 0
    assert "A1111/ComfyUI would ignore" in capsys.readouterr().out

"""LyCORIS files (LoHa, LoKr, DoRA, full deltas, Tucker forms) against lycoris-lora itself, the independent
reference: a network LyCORIS creates and saves on the same pipeline loads in imglora with every key used,
and imglora's output at weight 1 equals LyCORIS's forward pass (not its merge_to, which applies alpha/dim
twice for LoHa and LoKr in 4.1.3). Then: merged equals run time, and a blend of mixed kinds equals the base
plus the weighted sum of their ΔW, per sample too."""

import copy
import warnings

import pytest
import torch
from safetensors.torch import load_file

from imglora.formats.lora_file import load_adapter, save_adapter
from imglora.lora.adapters import Adapters
from imglora.lora.inject import find

# preset: LyCORIS's "attn-mlp" (Linear layers of the UNet transformers and the text encoders), or a preset
# with the ResNet and sampler convolutions too (LyCORIS's own "full" preset trips over a duplicated
# time_embedding name on a diffusers UNet).
CONV_PRESET = """enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out"]
text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
text_encoder_target_name = []
"""
CASES = {  # id: (arch, algo, LyCORIS network kwargs, kinds imglora must see)
    "loha-conv": ("sd1", "loha", {}, {"loha"}),
    "loha-tucker": ("sd1", "loha", {"use_tucker": True}, {"loha"}),
    "lokr-conv": ("sd1", "lokr", {"factor": 4}, {"lokr"}),
    "lokr-decomposed": ("sd1", "lokr", {"decompose_both": True, "factor": 2}, {"lokr"}),
    "locon-tucker": ("sd1", "locon", {"use_tucker": True}, {"lora"}),
    "dora-locon": ("sd1", "locon", {"dora_wd": True}, {"lora+dora"}),
    "dora-loha": ("sd1", "loha", {"dora_wd": True}, {"loha+dora"}),
    "full": ("sd1", "full", {}, {"full"}),
    "locon-norms": ("sd1", "locon", {"train_norm": True}, {"lora", "norm"}),
    "oft": ("sd1", "diag-oft", {}, {"oft"}),
    "oft-constrained": ("sd1", "diag-oft", {"constraint": 1e-3, "rescaled": True}, {"oft"}),
    "boft": ("sd1", "boft", {}, {"boft"}),
    "ia3": ("sd1", "ia3", {}, {"ia3"}),
    "ia3-on-input": ("sd1", "ia3", {"train_on_input": True}, {"ia3"}),
    "glora": ("sd1", "glora", {}, {"glora"}),
    "loha-sdxl": ("sdxl", "loha", {"preset": "attn-mlp"}, {"loha"}),
    "lokr-sdxl": ("sdxl", "lokr", {"preset": "attn-mlp", "factor": 4}, {"lokr"}),
}


def lycoris_file(pipe, algo, kwargs, path, seed=0):
    """A LyCORIS network on a copy of `pipe`, its weights random (non-zero), saved; returns the copy with
    the network applied (LyCORIS's own forward) and the file."""
    from lycoris.kohya import create_network

    ref = copy.deepcopy(pipe)
    kwargs = dict(kwargs)
    if "preset" not in kwargs:
        (path.parent / "conv.toml").write_text(CONV_PRESET)
        kwargs["preset"] = str(path.parent / "conv.toml")
    torch.manual_seed(seed)
    encoders = [ref.text_encoder] + ([ref.text_encoder_2] if getattr(ref, "text_encoder_2", None) else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = create_network(1.0, 4, 2.0, None, encoders if len(encoders) > 1 else encoders[0], ref.unet,
                             algo=algo, **kwargs)
    net.apply_to(encoders if len(encoders) > 1 else encoders[0], ref.unet, True, True)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "dora_scale" in name:  # the magnitudes stay near the base weight's norms, as after training
                p.mul_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * 0.4)
    net.save_weights(str(path), torch.float32, {})
    return ref, path


def outputs(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 10, (2, 8), generator=g)
    x = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        embeds = pipe.text_encoder(ids)[0]
        kwargs = {}
        if getattr(pipe, "text_encoder_2", None) is not None:
            out2 = pipe.text_encoder_2(ids, output_hidden_states=True)
            embeds = torch.cat([pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2],
                                out2.hidden_states[-2]], dim=-1)
            kwargs["added_cond_kwargs"] = {"text_embeds": out2.text_embeds, "time_ids": torch.ones(2, 6)}
        fixed = torch.randn(embeds.shape, generator=g)  # the UNet compared on the same conditioning
        return embeds, pipe.unet(x, torch.tensor([10, 600]), fixed, **kwargs).sample


@pytest.mark.parametrize("case", CASES)
def test_a_lycoris_file_loads_whole_and_matches_lycoris(make_pipe, tmp_path, case):
    arch, algo, kwargs, kinds = CASES[case]
    pipe = make_pipe(arch)
    base = outputs(pipe)
    ref, path = lycoris_file(pipe, algo, kwargs, tmp_path / "lycoris.safetensors")
    adapter, fmt = load_adapter(path, pipe.unet.config.layers_per_block)
    assert fmt == "kohya" and set(adapter.kinds()) == kinds
    two_part = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "a1.weight", "a2.weight", "b1.weight",
                "b2.weight")
    names = {k.rsplit(".", 2 if k.endswith(two_part) else 1)[0] for k in load_file(path)}
    assert len(adapter.modules) == len(names)  # every module of the file, none dropped
    adapters = Adapters(pipe)
    adapters.load("x", adapter)
    want, got = outputs(ref), outputs(pipe)
    for w, g, b in zip(want, got, base):
        assert (w - b).abs().max() > 1e-2  # the adapter changes the output: the comparison is not trivial
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    adapters.merge()
    for g, m in zip(got, outputs(pipe)):
        torch.testing.assert_close(m, g, rtol=1e-4, atol=2e-5)
    adapters.unmerge()
    fresh = make_pipe(arch)
    for key, layer in adapters.layers.items():  # unmerge restored every base weight bit for bit
        component, _, path = key.partition(".")
        assert torch.equal(layer.base.weight, find(getattr(fresh, component), path).weight)


@pytest.mark.parametrize("algo, kwargs", [("loha", {"dora_wd": True, "use_tucker": True}),
                                          ("diag-oft", {"rescaled": True}), ("boft", {}), ("ia3", {}), ("glora", {})])
def test_imglora_writes_lycoris_files_back_unchanged(make_pipe, tmp_path, algo, kwargs):
    """Read a LyCORIS file, write it as kohya, read it again: every tensor equal, same keys, except that
    imglora writes the canonical text-encoder names (lora_te_text_model_encoder_…, what A1111 and ComfyUI
    read) where LyCORIS under transformers 5 drops the text_model_ level."""
    pipe = make_pipe("sd1")
    _, path = lycoris_file(pipe, algo, kwargs, tmp_path / "in.safetensors")
    adapter, _ = load_adapter(path, pipe.unet.config.layers_per_block)
    save_adapter(tmp_path / "out.safetensors", adapter, layers_per_block=pipe.unet.config.layers_per_block)
    a, b = load_file(path), load_file(tmp_path / "out.safetensors")
    assert all(k.startswith("lora_te_text_model_") for k in b if k.startswith("lora_te_"))
    b = {k.replace("lora_te_text_model_", "lora_te_"): v for k, v in b.items()}
    assert a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)


def test_a_blend_of_mixed_kinds_is_the_base_plus_the_weighted_deltas(make_pipe, tmp_path):
    pipe = make_pipe("sd1")
    lpb = pipe.unet.config.layers_per_block
    files = {name: lycoris_file(pipe, algo, kw, tmp_path / f"{name}.safetensors", seed=i)[1]
             for i, (name, algo, kw) in enumerate([("lo", "locon", {}), ("ha", "loha", {}), ("kr", "lokr", {}),
                                                   ("do", "locon", {"dora_wd": True}),
                                                   ("nm", "locon", {"train_norm": True}), ("ft", "diag-oft", {}),
                                                   ("ia", "ia3", {}), ("gl", "glora", {})])}
    adapters = Adapters(pipe)
    for name, path in files.items():
        adapters.load(name, load_adapter(path, lpb)[0])
    weights = {"lo": 0.7, "ha": -0.5, "kr": 1.3, "do": 0.4, "nm": 0.6, "ft": 0.3, "ia": -0.2, "gl": 0.5}
    for name, w in weights.items():
        adapters.set_weight(name, w)
    for key, layer in adapters.layers.items():
        w0 = layer.base.weight.detach()
        want = sum(w * layer.adapters[n].delta(w0) for n, w in weights.items() if n in layer.adapters)
        torch.testing.assert_close(layer.delta(), want)
    blended = outputs(pipe)
    # Per-sample weights: one batch of two blends equals the two blends rendered apart.
    rows = [weights, {"lo": 0.0, "ha": 1.0, "kr": 0.0, "do": 1.0, "nm": -0.5, "ft": 1.0, "ia": 0.0, "gl": -1.0}]
    adapters.set_sample_weights(rows)
    g = torch.Generator().manual_seed(1)
    x, e = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 8, 32, generator=g)
    with torch.no_grad():
        both = pipe.unet(x, torch.tensor([300, 300]), e).sample
    adapters.set_sample_weights(None)
    for i, row in enumerate(rows):
        for name, w in row.items():
            adapters.set_weight(name, w)
        with torch.no_grad():
            alone = pipe.unet(x[i:i + 1], torch.tensor([300]), e[i:i + 1]).sample
        torch.testing.assert_close(both[i:i + 1], alone, rtol=1e-4, atol=1e-5)
    for name, w in weights.items():
        adapters.set_weight(name, w)
    for a, b in zip(blended, outputs(pipe)):
        torch.testing.assert_close(a, b)  # the cached ΔW survived the weight changes unchanged


def test_inspect_names_the_kinds_and_the_client_naming(make_pipe, tmp_path):
    """LyCORIS under transformers 5 writes text-encoder names A1111 and ComfyUI do not map; re-saved by
    imglora the same adapter has the canonical names, and inspect says which kind it is."""
    from imglora.formats.inspect import describe

    pipe = make_pipe("sd1")
    _, path = lycoris_file(pipe, "loha", {"preset": "attn-mlp"}, tmp_path / "in.safetensors")
    adapter, _ = load_adapter(path)
    save_adapter(tmp_path / "out.safetensors", adapter)
    theirs, ours = describe(path), describe(tmp_path / "out.safetensors")
    assert ours["kinds"] == {"loha": len(adapter.modules)} and ours["warnings"] == []
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        assert any("text-encoder modules neither loader maps" in w for w in theirs["warnings"])


def test_peft_forms_of_loha_lokr_and_dora_load_and_match_peft(make_pipe, tmp_path):
    """peft (the second reference) injects LoHa, LoKr and DoRA into a UNet; its state dict saved with the
    config in lora_adapter_metadata, as diffusers writes it, loads in imglora with the same output."""
    import json

    from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    configs = {"loha": LoHaConfig(r=4, alpha=6, target_modules=["to_q", "to_v", "proj_in"]),
               "lokr": LoKrConfig(r=2, alpha=3, target_modules=["to_q", "to_k"]),
               "dora": LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_out.0"], use_dora=True)}
    for kind, cfg in configs.items():
        ref, ours = make_pipe("sd1"), make_pipe("sd1")
        inject_adapter_in_model(cfg, ref.unet, adapter_name="default")
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in ref.unet.named_parameters():
                if any(t in name for t in ("hada_", "lokr_", "lora_A", "lora_B")):
                    p.copy_(torch.randn_like(p) * 0.3)
                elif "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.2 * torch.randn_like(p))
        state = {f"unet.{k}": v.contiguous() for k, v in get_peft_model_state_dict(ref.unet).items()}
        meta = {k: v for k, v in cfg.to_dict().items() if k in ("r", "alpha", "lora_alpha", "rank_pattern",
                                                                "alpha_pattern")}
        file = tmp_path / f"{kind}.safetensors"
        save_file(state, str(file), metadata={"lora_adapter_metadata": json.dumps({f"unet.{k}": v
                                                                                   for k, v in meta.items()})})
        adapter, fmt = load_adapter(file)
        assert fmt == "peft" and set(adapter.kinds()) == {"lora+dora" if kind == "dora" else kind}
        Adapters(ours).load("x", adapter)
        want, got = outputs(ref)[1], outputs(ours)[1]
        assert (want - outputs(make_pipe("sd1"))[1]).abs().max() > 1e-2, kind
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=kind)


def test_older_oft_and_glora_layouts_give_the_same_delta():
    """Files from before LyCORIS 2 (read by A1111): GLoRA with the roles of its 1 and 2 factors swapped, and
    OFT's rotations stored as they are (oft_diag). Each gives the ΔW of the current layout, and GLoRA's is
    A1111's formula b2·b1 + W0·a2·a1 (scaled by alpha/rank)."""
    from imglora.lora.modules import _cayley, module_from_parts

    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(12, 8, generator=g)
    a1, a2, b1, b2 = (torch.randn(*s, generator=g) for s in ((8, 3), (3, 8), (12, 3), (3, 8)))
    new = module_from_parts("m", {"a1.weight": a1, "a2.weight": a2, "b1.weight": b1, "b2.weight": b2,
                                  "alpha": torch.tensor(6.0)})
    old = module_from_parts("m", {"a1.weight": a2, "a2.weight": a1, "b1.weight": b2, "b2.weight": b1,
                                  "alpha": torch.tensor(6.0)})
    torch.testing.assert_close(old.delta(w0), new.delta(w0))
    torch.testing.assert_close(old.delta(w0), 2.0 * (b1 @ b2 + w0 @ a1 @ a2))
    blocks = torch.randn(3, 4, 4, generator=g)
    oft = module_from_parts("m", {"oft_blocks": blocks})
    diag = module_from_parts("m", {"oft_diag": _cayley(blocks, 0.0)})
    torch.testing.assert_close(diag.delta(w0), oft.delta(w0))
    r = _cayley(blocks, 0.0)
    assert torch.allclose(r @ r.transpose(1, 2), torch.eye(4).expand(3, 4, 4), atol=1e-5)  # rotations
    assert torch.allclose((w0 + oft.delta(w0)).norm(dim=0), w0.norm(dim=0), atol=1e-4)  # column norms kept

"""LoraLayer and Adapters: the math of one layer and of a whole pipeline, against direct definitions."""

import pytest
import torch
from torch import nn

from imglora.lora.adapters import AdapterError, Adapters
from imglora.lora.layer import LoraLayer
from imglora.lora.modules import LoraModule

LAYERS = {
    "linear": lambda: nn.Linear(12, 10),
    "conv1x1": lambda: nn.Conv2d(6, 8, 1),
    "conv3x3": lambda: nn.Conv2d(6, 8, 3, padding=1, stride=2),
}


def _input(kind, batch=4):
    return torch.randn(batch, 5, 12) if kind == "linear" else torch.randn(batch, 6, 9, 9)


def _random_adapter(layer, name, rank, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    layer.add(name, rank, alpha)
    # B starts at zero; fill it so that the adapter does something (peft's set_init_weights_false).
    layer.adapters[name].B.data = torch.randn(layer.adapters[name].B.shape, generator=g) * 0.5
    return layer.module(name)


@pytest.mark.parametrize("kind", LAYERS)
def test_new_adapter_starts_at_the_base(kind):
    torch.manual_seed(0)
    base = LAYERS[kind]()
    x = _input(kind)
    expected = base(x)
    layer = LoraLayer(base)
    layer.add("a", rank=4, alpha=4)
    assert torch.equal(layer(x), expected)
    assert layer.adapters["a"].B.abs().sum() == 0 and layer.adapters["a"].A.abs().sum() > 0
    layer.add("g", rank=4, alpha=4, init="gaussian")
    assert torch.allclose(layer.adapters["g"].A.std(), torch.tensor(0.25), rtol=0.5)


@pytest.mark.parametrize("kind", LAYERS)
def test_blend_equals_base_plus_weighted_deltas(kind):
    torch.manual_seed(0)
    base = LAYERS[kind]()
    x = _input(kind)
    layer = LoraLayer(base)
    m1 = _random_adapter(layer, "one", 4, 2.0, 1)
    m2 = _random_adapter(layer, "two", 2, 8.0, 2)
    layer.set_weight("one", 0.7)
    layer.set_weight("two", -0.4)
    w = base.weight.detach() + 0.7 * m1.delta() + -0.4 * m2.delta()
    ref = nn.functional.linear(x, w, base.bias) if kind == "linear" else nn.functional.conv2d(
        x, w, base.bias, base.stride, base.padding)
    with torch.no_grad():
        got = layer(x)
    assert torch.allclose(got, ref, atol=1e-5)
    # The training path (autograd through the stacked matmul) gives the same numbers.
    assert torch.allclose(layer(x), ref, atol=1e-5)


@pytest.mark.parametrize("kind", LAYERS)
def test_per_sample_weights_equal_separate_runs(kind):
    torch.manual_seed(0)
    layer = LoraLayer(LAYERS[kind]())
    _random_adapter(layer, "one", 4, 4.0, 1)
    _random_adapter(layer, "two", 3, 3.0, 2)
    x = _input(kind, batch=6)  # 3 blends, batch doubled as classifier-free guidance does
    rows = [{"one": 1.0}, {"one": 0.5, "two": 0.5}, {"two": -1.0}]
    layer.set_sample_weights(["one", "two"], torch.tensor([[r.get("one", 0.0), r.get("two", 0.0)] for r in rows]))
    with torch.no_grad():
        together = layer(x)
    layer.set_sample_weights([], None)
    for i in range(6):
        row = rows[i % 3]
        layer.set_weight("one", row.get("one", 0.0))
        layer.set_weight("two", row.get("two", 0.0))
        with torch.no_grad():
            alone = layer(x[i:i + 1])
        assert torch.allclose(together[i:i + 1], alone, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_then_unmerge_is_bit_identical(dtype):
    torch.manual_seed(0)
    base = nn.Linear(16, 16).to(dtype)
    original = base.weight.detach().clone()
    layer = LoraLayer(base)
    _random_adapter(layer, "a", 4, 4.0, 3)
    x = torch.randn(2, 16).to(dtype)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert not torch.equal(base.weight, original)
        merged = layer(x)
        layer.set_weight("a", 0.3)
        layer.merge()  # a weight change re-merges from the exact original
        layer.unmerge()
    assert torch.equal(base.weight, original)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert torch.allclose(unmerged.float(), merged.float(), atol=tol)


def test_only_adapters_require_grad_and_train(make_pipe):
    pipe = make_pipe("sd1")
    for m in (pipe.unet, pipe.text_encoder, pipe.vae):
        m.requires_grad_(False)
    adapters = Adapters(pipe)
    params = adapters.create("t", adapters.targets("attn", text_encoder=True), rank=2)
    trainable = [p for m in (pipe.unet, pipe.text_encoder) for p in m.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in params}
    # 4 transformer blocks (down, mid, 2 up) x attn1+attn2 x 4 projections; 3 TE layers x 4; A and B each
    assert len(params) == 2 * (32 + 12)


def test_presets_pick_the_documented_modules(make_pipe):
    pipe = make_pipe("sd1")
    a = Adapters(pipe)
    cross = a.targets("cross-attn")
    assert cross and all(".attn2." in k for k in cross) and len(cross) == 16
    attn = a.targets("attn")
    assert len(attn) == 32 and set(cross) < set(attn)
    transformer = a.targets("transformer")
    leaves = {k.split("transformer_blocks.0.")[-1] if "transformer_blocks" in k else k.rsplit(".", 1)[-1]
              for k in transformer}
    assert {"proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "attn1.to_q", "attn2.to_out.0"} <= leaves
    conv = a.targets("conv")
    assert set(transformer) < set(conv) and any(k.endswith("resnets.0.conv1") for k in conv)
    te = a.targets("cross-attn", text_encoder=True, te_mlp=True)
    assert sum(k.endswith("mlp.fc1") for k in te) == 3 and sum(k.endswith("q_proj") for k in te) == 3
    xl = Adapters(make_pipe("sdxl")).targets("cross-attn", text_encoder=True)
    assert any(k.startswith("text_encoder_2.") for k in xl)


def test_enable_disable_remove_restore_the_base(make_pipe):
    pipe = make_pipe("sd1")
    unet = pipe.unet
    x = torch.randn(1, 4, 8, 8)
    t = torch.tensor([10])
    ctx = torch.randn(1, 5, 32)
    with torch.no_grad():
        before = unet(x, t, ctx).sample
    adapters = Adapters(pipe)
    params = adapters.create("a", adapters.targets("attn"), rank=2)
    for p in params:
        p.data.normal_(0, 0.5)
    with torch.no_grad():
        on = unet(x, t, ctx).sample
        adapters.enable("a", False)
        off = unet(x, t, ctx).sample
        adapters.enable("a", True)
        adapters.merge()
        merged = unet(x, t, ctx).sample
        adapters.remove("a")
        after = unet(x, t, ctx).sample
    assert not torch.allclose(on, before)
    assert torch.equal(off, before)
    assert torch.allclose(merged, on, atol=1e-5)
    assert torch.equal(after, before)
    assert not any(isinstance(m, LoraLayer) for m in unet.modules())


def test_load_is_strict(make_pipe):
    adapters = Adapters(make_pipe("sd1"))
    good = LoraModule(torch.zeros(2, 16), torch.zeros(16, 2), 2.0)
    from imglora.lora.state import Adapter

    key = adapters.targets("cross-attn")[0]
    with pytest.raises(AdapterError, match="does not exist"):
        adapters.load("x", Adapter({key: good, "unet.nope.to_q": good}))
    with pytest.raises(AdapterError, match="do not fit"):
        adapters.load("x", Adapter({key: LoraModule(torch.zeros(2, 99), torch.zeros(16, 2), 2.0)}))
    assert adapters.names == [] and not adapters.layers  # nothing half-loaded
    with pytest.raises(AdapterError, match="name"):
        adapters.load("../evil", Adapter({}))
    with pytest.raises(AdapterError, match=f"module {key}: no adapter kind holds a dict"):
        adapters.load("x", Adapter({key: {"hada_w1_a": torch.zeros(2, 16)}}))
    assert adapters.names == [] and not adapters.layers


def test_parameters_are_named_for_checkpoints(make_pipe):
    """Training checkpoints store '{layer}.A' / '{layer}.B': the names must not move with the layer's insides."""
    adapters = Adapters(make_pipe("sd1"))
    keys = adapters.targets("cross-attn")
    params = adapters.create("x", keys, rank=2)
    named = adapters.named_parameters("x")
    assert list(named) == [f"{k}.{t}" for k in keys for t in ("A", "B")]
    assert [id(p) for p in params] == [id(p) for p in named.values()]
    layer = adapters.layers[keys[0]]
    assert named[f"{keys[0]}.A"] is layer.adapters["x"].A and layer.module("x").rank == 2

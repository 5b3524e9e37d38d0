"""How stacked adapters interact (inspect A B ...), and the normalised blend."""

import copy

import pytest
import torch

from helpers import random_adapter
from imglora.cli import main
from imglora.formats.lora_file import save_adapter
from imglora.lora.adapters import Adapters
from imglora.lora.blocks import block_of
from imglora.lora.modules import LoraModule
from imglora.lora.state import Adapter, Blend
from imglora.ops.interact import report


def _negated(adapter):
    return Adapter({k: LoraModule(m.A, -m.B, m.alpha) for k, m in adapter.modules.items()}, {}, adapter.arch)


def test_norms_overlaps_and_singular_values_per_block(make_pipe):
    pipe = make_pipe("sd1")
    lpb = pipe.unet.config.layers_per_block
    a = random_adapter(pipe, "attn", text_encoder=True, seed=0, scale=0.3)
    b = random_adapter(pipe, "attn", text_encoder=True, seed=1, scale=0.3)
    r = report({"a": a, "same": copy.deepcopy(a), "neg": _negated(a), "b": b}, lpb)
    for block, row in r["blocks"].items():
        assert row["cos"]["a|same"] == pytest.approx(1.0, abs=1e-5)
        assert row["cos"]["a|neg"] == pytest.approx(-1.0, abs=1e-5)
        assert abs(row["cos"]["a|b"]) < 0.3  # independent random adapters are nearly orthogonal
        # The norm is the root of the summed squares of the block's ΔW, computed here from the modules.
        want = sum(float(m.delta().square().sum()) for k, m in a.modules.items() if block_of(k, lpb) == block) ** 0.5
        assert row["norm"]["a"] == pytest.approx(want, rel=1e-5)
        # The top singular values are those of the block's most spiky module, from its full ΔW.
        best = max((torch.linalg.svdvals(m.delta().flatten(1)) for k, m in a.modules.items()
                    if block_of(k, lpb) == block), key=lambda s: float(s[0]))
        assert row["top"]["a"] == pytest.approx(best[:3].tolist(), rel=1e-4)
    assert any("a and same overlap strongly" in w for w in r["warnings"])
    assert not any("a and b overlap" in w for w in r["warnings"])


def test_inspect_with_several_files_prints_the_interaction_table(make_pipe, tmp_path, capsys):
    pipe = make_pipe("sd1")
    a = random_adapter(pipe, "attn", seed=0, scale=0.3)
    files = [save_adapter(tmp_path / "a.safetensors", a), save_adapter(tmp_path / "b.safetensors", copy.deepcopy(a)),
             save_adapter(tmp_path / "c.safetensors", random_adapter(pipe, "cross-attn", seed=2, scale=0.3))]
    assert main(["inspect", *map(str, files)]) == 0
    out = capsys.readouterr().out
    assert "How they interact, per block" in out and "cos a·b" in out and "+1.00" in out
    assert "a and b overlap strongly" in out


def test_a_normalised_blend_keeps_each_layer_within_its_largest_update(make_pipe):
    pipe = make_pipe("sd1")
    a = random_adapter(pipe, "attn", seed=0, scale=0.3)
    adapters = Adapters(pipe)
    adapters.load("a", a)
    adapters.load("twin", copy.deepcopy(a))
    adapters.load("b", random_adapter(pipe, "attn", seed=1, scale=0.3))
    adapters.apply(Blend({"a": 1.0, "twin": 1.0}, normalize=True))
    for layer in adapters.layers.values():  # two identical updates: their sum is cut to one of them
        torch.testing.assert_close(layer.delta(), layer.adapters["a"].delta(layer.base.weight))
    adapters.apply(Blend({"a": 0.8, "b": 1.0}, normalize=True))
    for layer in adapters.layers.values():
        w0 = layer.base.weight
        largest = max(float((w * layer.adapters[n].delta(w0)).norm()) for n, w in (("a", 0.8), ("b", 1.0)))
        assert float(layer.delta().norm()) <= largest * (1 + 1e-5)
    adapters.apply(Blend({"a": 0.8, "b": 1.0}))  # off again: the plain sum
    layer = next(iter(adapters.layers.values()))
    torch.testing.assert_close(layer.delta(), 0.8 * layer.adapters["a"].delta(layer.base.weight)
                               + layer.adapters["b"].delta(layer.base.weight))

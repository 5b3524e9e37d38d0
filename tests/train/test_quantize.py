"""The 8-bit frozen base: adapters train on it as on the dequantized base, and the backward pass does
not keep full-precision copies of the quantized weights."""

import pytest
import torch
from torch import nn

from imglora.lora.layer import LoraLayer
from imglora.train.quantize import QuantizedLinear, quantize_frozen

pytest.importorskip("torchao")


def _stack(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 96), nn.GELU(), nn.Linear(96, 32))


def _adapt(model):
    """LoRA on the middle layer, B filled so that it contributes."""
    layer = LoraLayer(model[2])
    layer.add("a", rank=4, alpha=4)
    layer.adapters["a"].B.data.normal_(std=0.1)
    model[2] = layer
    return layer


def test_adapter_gradients_match_the_dequantized_base():
    quantized = _stack()
    quantized.requires_grad_(False)
    assert quantize_frozen(quantized, "int8") == 3
    assert all(type(m) is QuantizedLinear for m in quantized if isinstance(m, nn.Linear))
    reference = _stack()
    reference.requires_grad_(False)
    for q, r in zip(quantized, reference):
        if isinstance(q, nn.Linear):  # the reference holds exactly what the int8 weights stand for
            r.weight.data = q.weight.dequantize().float()
    torch.manual_seed(1)
    lq, lr = _adapt(quantized), _adapt(reference)
    lr.adapters["a"].A.data, lr.adapters["a"].B.data = lq.adapters["a"].A.data.clone(), lq.adapters["a"].B.data.clone()
    x = torch.randn(8, 64, requires_grad=True)
    for model in (quantized, reference):
        model(x).square().mean().backward()
    ga, gb = lq.adapters["a"].A.grad, lq.adapters["a"].B.grad
    torch.testing.assert_close(ga, lr.adapters["a"].A.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gb, lr.adapters["a"].B.grad, rtol=1e-4, atol=1e-6)
    assert ga.abs().sum() > 0 and gb.abs().sum() > 0


def test_backward_keeps_no_full_precision_weight():
    model = _stack()
    model.requires_grad_(False)
    quantize_frozen(model, "int8")
    _adapt(model)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(8, 64)).square().mean().backward()
    weight_shapes = {(128, 64), (96, 128), (32, 96), (64, 128), (128, 96), (96, 32)}
    kept = [s for s in saved if s[0] in weight_shapes and s[1].is_floating_point]
    assert saved and not kept, kept

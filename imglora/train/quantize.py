"""An 8-bit frozen base: the UNet's Linear weights stored in int8 (or fp8) through torchao, while the
adapters train in float32 on top (QLoRA's idea; PERFORMANCE.md §4.8).

torchao's quantized linear lets autograd save the *dequantized* weight for the backward pass, which
puts a full-precision copy of every Linear weight back in memory during each step: on SD 1.5 (270 M
of its 860 M UNet weights are Linear) that was +1.08 GB, more than int8 saves. QuantizedLinear saves
nothing and dequantizes one layer at a time in the backward pass instead, as QLoRA does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ImgloraError
from ..memory import trim_heap


class _FrozenLinearFn(torch.autograd.Function):
    """y = x·Wᵀ + b for a frozen quantized W. Autograd saves nothing; the backward pass to x
    dequantizes W again, one layer at a time (QLoRA's backward)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight = weight  # the quantized parameter itself, already held by the module
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        w = ctx.weight.dequantize().to(grad.dtype)
        return grad @ w, None, None


class QuantizedLinear(nn.Linear):
    """nn.Linear whose frozen weight is a torchao quantized tensor (same state-dict keys)."""

    def forward(self, x):
        return _FrozenLinearFn.apply(x, self.weight, self.bias)


def quantize_frozen(module: nn.Module, kind: str) -> int:
    """Quantize every frozen Linear of `module` in place; returns how many. Done before adapters attach."""
    try:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise ImgloraError(f"--quantize-base {kind} needs torchao", "pip install torchao") from None
    quantize_(module, Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig())
    count = 0
    for m in module.modules():
        if type(m) is nn.Linear and type(m.weight.data) is not torch.Tensor:
            m.__class__ = QuantizedLinear  # same parameters and keys, only the forward differs
            count += 1
    trim_heap()  # the float32 weights just replaced and quantize_'s temporaries
    return count

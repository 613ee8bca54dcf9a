"""int8 weight-only quantization: per-output-channel scales, bfloat16 activations."""

from __future__ import annotations

import torch
from torch import nn

from nextok.kernels import has
from nextok.kernels.fused import LinearWeights
from nextok.kernels.ops import packed_linear
from nextok.kernels.packing import pack_weight, unpack_weight
from nextok.models.linear import PackedLinear


class Int8Linear(nn.Module):
    """A linear layer holding int8 weights (out, in) and one scale per output channel.

    With nextok's CPU kernels the weights are also kept packed for them; their product beats aten's
    `_weight_int8pack_mm` at every batch size measured here (1 to 256 rows, benchmarks/kernels.py),
    which serves machines without the kernels.
    """

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        weight = linear.weight.detach().float()  # (out, in)
        self.out_features, self.in_features = weight.shape
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # (out,)
        quantized = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("scale_f32", self.scale.float())
        bias = getattr(linear, "bias", None)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))
        usable = has("linear_int8") and weight.device.type == "cpu" and self.in_features % 2 == 0
        # The packed copy is all the kernel needs; aten's product needs the (out, in) one.
        self.register_buffer("packed", pack_weight(quantized) if usable else None)
        self.register_buffer("weight", None if usable else quantized)

    def kernel_weights(self) -> LinearWeights | None:
        if self.packed is None:
            return None
        return LinearWeights(self.packed, self.bias, self.out_features, torch.bfloat16, scale=self.scale_f32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.to(torch.bfloat16)
        if self.packed is not None and x.device.type == "cpu" and not torch.compiler.is_compiling():
            return packed_linear(x, self.packed, self.out_features, self.bias, self.scale_f32)
        weight = self.weight if self.weight is not None else unpack_weight(self.packed, self.out_features)
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]), weight, self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], -1)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every linear layer (the tied head included, as a copy) with an Int8Linear, in place."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, (nn.Linear, PackedLinear)):
                setattr(module, child_name, Int8Linear(child))
    return model

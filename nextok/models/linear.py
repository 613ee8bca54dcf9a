"""Linear layers laid out for the CPU.

With nextok's kernels (nextok/kernels) a layer keeps its weights packed for them, and only packed:
the kernels serve every batch size, each row the same way whatever the number of rows (a request's
tokens never depend on its batch). Without the kernels, float32 matrices are stored transposed, the
layout MKL's matrix-vector product streams fastest.

float32 matrices that a quantized checkpoint (GGUF Q4_1, Q8_0) filled are kept in its block format
(`packing.pack_blocks`): the kernel computes exactly the dense product from a fraction of the bytes.
bfloat16 layers do the same: the kernel widens the blocks to the float32 values rounded to bfloat16,
so the product equals the one over the cast dense matrix bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nextok.kernels import has
from nextok.kernels.fused import LinearWeights
from nextok.kernels.ops import packed_linear
from nextok.kernels.packing import pack_blocks, pack_weight, unpack_weight


class PackedLinear(nn.Module):
    """y = x W^T + b with W (N, K) packed for the CPU kernels."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype | None = None) -> None:
        """dtype: the layer's dtype (default: the weight's). float32 weights become bfloat16 here where
        asked, after their block format (if any) was read from the float32 values."""
        super().__init__()
        weight = linear.weight.detach()
        self.dtype = dtype = dtype or weight.dtype
        self.out_features, self.in_features = weight.shape
        blocks = pack_blocks(weight, dtype)  # None unless in a block format
        self.register_buffer("packed", pack_weight(weight.to(dtype)) if blocks is None else blocks)
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The (out, in) matrix, rebuilt from the packed one."""
        return unpack_weight(self.packed, self.out_features, self.dtype)

    def kernel_weights(self) -> LinearWeights:
        return LinearWeights(self.packed, self.bias, self.out_features, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.dtype and x.device.type == "cpu" and not torch.compiler.is_compiling():
            return packed_linear(x, self.packed, self.out_features, self.bias)
        return F.linear(x.to(self.dtype), self.weight, self.bias)


class TransposedLinear(nn.Module):
    """y = x W^T + b with W kept transposed and contiguous, (in_features, out_features).

    MKL streams a (in, out) matrix about 20% faster than the (out, in) layout nn.Linear keeps
    (measured on the 135M default model, float32, batch 1).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)  # (in, out)
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return x @ self.weight_t
        return torch.addmm(self.bias, x, self.weight_t) if x.dim() == 2 else x @ self.weight_t + self.bias


def reads_float32(dtype: torch.dtype) -> bool:
    """Whether layout_linears(model, dtype) can keep layers in a block format and so wants their float32 values.

    A block format is recognised from the float32 values a quantized checkpoint filled
    (packing.pack_blocks); bfloat16 layers keep it wherever the bfloat16 kernels run.
    """
    return dtype == torch.bfloat16 and has("linear_bf16")


def layout_linears(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Give every nn.Linear of a CPU model its layout for decoding, in place (see the module docstring).

    dtype: the dtype the layers compute in (default: each weight's own); float32 weights are cast
    to it here, so that bfloat16 layers can still read their block format from the float32 values.
    """
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear) or child.weight.device.type != "cpu":
                continue
            target = dtype or child.weight.dtype
            if (target == torch.float32 and has("linear_f32")
                    or target == torch.bfloat16 and has("linear_bf16") and child.in_features % 2 == 0):
                setattr(module, name, PackedLinear(child, target))
            elif target == torch.float32:
                setattr(module, name, TransposedLinear(child))
            else:
                child.to(target)
    return model

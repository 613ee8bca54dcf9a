"""Linear layers laid out for the CPU.

With nextok's kernels (nextok/kernels) a layer keeps its weights packed for them. The packed
product matches or beats MKL and oneDNN at every batch size measured here (benchmarks/kernels.py)
for float32, and for bfloat16 where the CPU has AMX; then the packed copy is the only one kept.
Without AMX, oneDNN's bfloat16 product wins from about 8 rows, so bfloat16 layers also keep the
(out, in) matrix for it. Without the kernels, float32 matrices are stored transposed, the layout
MKL's matrix-vector product streams fastest.

float32 matrices that a quantized checkpoint (GGUF Q4_1, Q8_0) filled are kept in its block format
(`ops.pack_blocks`): the kernel computes exactly the dense product from a fraction of the bytes.
bfloat16 layers do the same where the CPU has AMX: the kernel widens the blocks to the float32
values rounded to bfloat16, so the product equals the one over the cast dense matrix bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nextok.kernels import amx_enabled, library
from nextok.kernels.fused import LinearWeights
from nextok.kernels.ops import packed_linear
from nextok.kernels.packing import pack_blocks, pack_weight, unpack_weight

BF16_ROWS_WITHOUT_AMX = 8  # above this many rows, oneDNN's bf16 product beats the AVX-512 kernel


class PackedLinear(nn.Module):
    """y = x W^T + b with W (N, K) packed for the CPU kernels (and kept as is where oneDNN serves large batches)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype | None = None) -> None:
        """dtype: the layer's dtype (default: the weight's). float32 weights become bfloat16 here where
        asked, after their block format (if any) was read from the float32 values."""
        super().__init__()
        weight = linear.weight.detach()
        self.dtype = dtype = dtype or weight.dtype
        self.out_features, self.in_features = weight.shape
        # None: the kernel serves every batch size
        self.kernel_rows = BF16_ROWS_WITHOUT_AMX if dtype == torch.bfloat16 and not amx_enabled() else None
        blocks = pack_blocks(weight, dtype) if self.kernel_rows is None else None  # None unless in a block format
        weight = weight.to(dtype)
        self.register_buffer("packed", pack_weight(weight) if blocks is None else blocks)
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self.dense = None if self.kernel_rows is None else nn.Parameter(weight, requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The (out, in) matrix (rebuilt from the packed one where only that is kept)."""
        return self.dense if self.dense is not None else unpack_weight(self.packed, self.out_features, self.dtype)

    def kernel_weights(self) -> LinearWeights:
        return LinearWeights(self.packed, self.bias, self.out_features, self.dtype, max_rows=self.kernel_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small = self.kernel_rows is None or x.numel() <= self.kernel_rows * self.in_features
        if small and x.dtype == self.dtype and x.device.type == "cpu" and not torch.compiler.is_compiling():
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
    (ops.pack_blocks); bfloat16 layers keep it where the AMX product serves every batch size.
    """
    return dtype == torch.bfloat16 and library() is not None and amx_enabled()


def layout_linears(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Give every nn.Linear of a CPU model its layout for decoding, in place (see the module docstring).

    dtype: the dtype the layers compute in (default: each weight's own); float32 weights are cast
    to it here, so that bfloat16 layers can still read their block format from the float32 values.
    """
    kernels = library() is not None
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear) or child.weight.device.type != "cpu":
                continue
            target = dtype or child.weight.dtype
            if kernels and (target == torch.float32 or target == torch.bfloat16 and child.in_features % 2 == 0):
                setattr(module, name, PackedLinear(child, target))
            elif target == torch.float32:
                setattr(module, name, TransposedLinear(child))
            else:
                child.to(target)
    return model

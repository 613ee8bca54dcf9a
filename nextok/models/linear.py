"""Linear layers laid out for the CPU.

With nextok's kernels (nextok/kernels) a layer keeps its weights packed for them. The packed
product matches or beats MKL and oneDNN at every batch size measured here (benchmarks/kernels.py)
for float32, and for bfloat16 where the CPU has AMX; then the packed copy is the only one kept.
Without AMX, oneDNN's bfloat16 product wins from about 8 rows, so bfloat16 layers also keep the
(out, in) matrix for it. Without the kernels, float32 matrices are stored transposed, the layout
MKL's matrix-vector product streams fastest.

float32 matrices that a quantized checkpoint (GGUF Q4_1, Q8_0) filled are kept in its block format
(`ops.pack_blocks`): the kernel computes exactly the dense product from a fraction of the bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nextok.kernels import amx_enabled, library
from nextok.kernels.ops import pack_blocks, pack_weight, packed_linear, unpack_weight

BF16_ROWS_WITHOUT_AMX = 8  # above this many rows, oneDNN's bf16 product beats the AVX-512 kernel


class PackedLinear(nn.Module):
    """y = x W^T + b with W (N, K) packed for the CPU kernels (and kept as is where oneDNN serves large batches)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.out_features, self.in_features = weight.shape
        blocks = pack_blocks(weight)  # None unless float32 in a block format
        self.dtype = weight.dtype
        self.register_buffer("packed", pack_weight(weight) if blocks is None else blocks)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        # None: the kernel serves every batch size
        self.kernel_rows = BF16_ROWS_WITHOUT_AMX if weight.dtype == torch.bfloat16 and not amx_enabled() else None
        self.dense = None if self.kernel_rows is None else nn.Parameter(weight, requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The (out, in) matrix (rebuilt from the packed one where only that is kept)."""
        return self.dense if self.dense is not None else unpack_weight(self.packed, self.out_features)

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


def layout_linears(model: nn.Module) -> nn.Module:
    """Give every nn.Linear of a CPU model its layout for decoding, in place (see the module docstring)."""
    kernels = library() is not None
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear) or child.weight.device.type != "cpu":
                continue
            dtype = child.weight.dtype
            if kernels and (dtype == torch.float32 or dtype == torch.bfloat16 and child.in_features % 2 == 0):
                setattr(module, name, PackedLinear(child))
            elif dtype == torch.float32:
                setattr(module, name, TransposedLinear(child))
    return model

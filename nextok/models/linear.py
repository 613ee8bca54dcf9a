"""Linear layers laid out for decoding on the CPU.

Decoding multiplies one row (or a few) by every weight matrix, so the layout of the weights
decides the speed. With nextok's kernels (nextok/kernels) a layer also keeps its weights packed
for them and takes the kernel for up to `kernel_rows` activation rows; larger products (prefill,
big batches) stay on MKL / oneDNN. Without the kernels, float32 matrices are stored transposed,
the layout MKL's matrix-vector product streams fastest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nextok.kernels import library
from nextok.kernels.ops import pack_weight, packed_linear

# Up to how many activation rows the packed kernel beats MKL / oneDNN here (benchmarks/kernels.py):
# float32 products stream at the memory bandwidth either way until ~64 rows; oneDNN's bfloat16
# products use AMX tiles and win from ~16 rows.
KERNEL_ROWS = {torch.float32: 64, torch.bfloat16: 8}


class PackedLinear(nn.Module):
    """y = x W^T + b, with W kept as loaded (N, K) and packed for the CPU kernels."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)  # (out, in); tied heads share it
        self.register_buffer("packed", pack_weight(self.weight.data))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.out_features, self.in_features = self.weight.shape
        self.kernel_rows = KERNEL_ROWS[self.weight.dtype]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype == self.weight.dtype and x.device.type == "cpu" and x.numel() <= self.kernel_rows * self.in_features
                and not torch.compiler.is_compiling()):
            return packed_linear(x, self.packed, self.out_features, self.bias)
        return F.linear(x, self.weight, self.bias)


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
    """Give every nn.Linear of a CPU model its decoding layout, in place (see the module docstring)."""
    kernels = library() is not None
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear) or child.weight.device.type != "cpu":
                continue
            dtype = child.weight.dtype
            if kernels and dtype in KERNEL_ROWS and (dtype == torch.float32 or child.in_features % 2 == 0):
                setattr(module, name, PackedLinear(child))
            elif dtype == torch.float32:
                setattr(module, name, TransposedLinear(child))
    return model

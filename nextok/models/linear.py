"""A float32 linear layer stored (in, out): MKL's matrix-vector products read that layout faster."""

from __future__ import annotations

import torch
from torch import nn


class TransposedLinear(nn.Module):
    """y = x W^T + b with W kept transposed and contiguous, (in_features, out_features).

    Decoding multiplies one row (or a few) by every weight matrix; on the CPU MKL streams a
    (in, out) matrix about 20% faster than the (out, in) layout nn.Linear keeps (measured on
    the 135M default model, float32, batch 1).
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


def transpose_linears(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of a float32 model with a TransposedLinear, in place."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.weight.dtype == torch.float32:
                setattr(module, name, TransposedLinear(child))
    return model

"""Linear layers laid out for the CPU.

With nextok's kernels (nextok/kernels) a layer keeps its weights packed for them, and only packed:
the kernels serve every batch size, each row the same way whatever the number of rows (a request's
tokens never depend on its batch). Without the kernels, float32 matrices are stored transposed, the
layout MKL's matrix-vector product streams fastest.

Quantized checkpoints keep their blocks: a GGUF file's quantized weights arrive as QuantizedLinear
layers (models/gguf_blocks.py reads their blocks) and are packed straight into the kernels' block
formats (`packing.pack_groups`); float32 matrices that still hold GGUF Q4_1 / Q8_0 groups exactly are
recognised (`packing.pack_blocks`). The kernel computes exactly the dense product from a fraction of
the bytes. bfloat16 layers do the same: the kernel widens the blocks to the float32 values rounded to
bfloat16, so the product equals the one over the cast dense matrix bit for bit.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from itertools import accumulate
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nextok.kernels import has
from nextok.kernels.fused import LinearWeights
from nextok.kernels.ops import packed_linear
from nextok.kernels.packing import GROUP_BYTES, common_format, Groups, pack_blocks, pack_groups, pack_weight, \
    unpack_weight

_WINDOW_WEIGHTS = 1 << 22  # QuantizedLinear.pack decodes and packs about this many weights at a time


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W still in a quantized checkpoint's blocks, until layout_linears packs it.

    parts: W's rows, top to bottom (several once q/k/v or gate/up are fused), each an object with
    `shape`, `format`, `groups(start, stop)` and `dequantize()` (gguf_blocks.QuantizedWeight).
    """

    def __init__(self, parts: list, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.parts = list(parts)
        self.out_features, self.in_features = sum(p.shape[0] for p in self.parts), self.parts[0].shape[1]
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @staticmethod
    def fuse(*linears: QuantizedLinear) -> QuantizedLinear:
        """One layer whose output is the concatenation of the given layers' outputs, still in blocks."""
        biases = [lin.bias for lin in linears]
        bias = None if biases[0] is None else torch.cat(biases)
        return QuantizedLinear([part for lin in linears for part in lin.parts], bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dense float32 (out, in) matrix."""
        return torch.cat([part.dequantize() for part in self.parts])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # unpacked (no kernels): the dense product
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def dense(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight = nn.Parameter(self.weight, requires_grad=False)
        linear.bias = self.bias
        return linear.requires_grad_(False)

    def pack(self, dtype: torch.dtype) -> torch.Tensor | None:
        """W in the block format all its parts fit (packing.pack_groups, for products in `dtype`), or None
        where a group fits none (a scale that is not finite). Packed a few million weights at a time, so
        that no dense copy of W is made and the temporaries stay small."""
        formats = {part.format for part in self.parts}
        fmt = common_format(formats)
        n, k = self.out_features, self.in_features
        out = torch.empty((n + 31) // 32 * 2, k // 32, GROUP_BYTES[fmt], dtype=torch.uint8)
        window = max(32, _WINDOW_WEIGHTS // k // 32 * 32)  # rows packed at a time, a multiple of 32
        bounds = list(accumulate((part.shape[0] for part in self.parts), initial=0))  # each part's first row

        def pack_window(start: int) -> bool:
            stop, pieces = min(start + window, n), []
            for part, first, last in zip(self.parts, bounds, bounds[1:]):
                if first < stop and start < last:
                    pieces.append(part.groups(max(start, first) - first, min(stop, last) - first))
            if any(piece is None for piece in pieces):
                return False
            pack_groups(Groups.cat(pieces, fmt), dtype, out[start // 16:(stop + 31) // 32 * 2])
            return True

        with ThreadPoolExecutor(max_workers=torch.get_num_threads()) as pool:  # numpy lets go of the GIL
            packed = all(pool.map(pack_window, range(0, n, window)))
        for part in self.parts:
            part.drop_pages()  # packed: its blocks need not stay in memory
        return out if packed else None


class QuantizedEmbedding(nn.Module):
    """An embedding table kept in a quantized checkpoint's blocks: each lookup dequantizes only its rows, to
    the values (in `dtype`) the dense table would hold. table: as a QuantizedLinear part, with `take(ids)`."""

    def __init__(self, table: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.table, self.dtype = table, dtype
        self.num_embeddings, self.embedding_dim = table.shape

    @property
    def weight(self) -> torch.Tensor:
        """The dense (num_embeddings, embedding_dim) table."""
        return self.table.dequantize().to(self.dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (...) -> (..., embedding_dim)
        if input_ids.numel() and not (0 <= int(input_ids.min()) and int(input_ids.max()) < self.num_embeddings):
            raise IndexError(f"QuantizedEmbedding: token ids must lie in 0..{self.num_embeddings - 1}")
        return self.table.take(input_ids.cpu()).to(self.dtype)


class PackedLinear(nn.Module):
    """y = x W^T + b with W (N, K) packed for the CPU kernels."""

    def __init__(self, linear: nn.Linear | QuantizedLinear, dtype: torch.dtype | None = None) -> None:
        """dtype: the layer's dtype (default: the weight's). float32 weights become bfloat16 here where
        asked, after their block format (if any) was read from the float32 values; a QuantizedLinear's
        blocks are packed as they are (dense only where no format holds them)."""
        super().__init__()
        quantized = isinstance(linear, QuantizedLinear)
        self.dtype = dtype = dtype or (torch.float32 if quantized else linear.weight.dtype)
        self.out_features, self.in_features = linear.out_features, linear.in_features
        blocks = linear.pack(dtype) if quantized else pack_blocks(linear.weight.detach(), dtype)  # None: dense
        self.register_buffer("packed", pack_weight(linear.weight.detach().to(dtype)) if blocks is None else blocks)
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


def keeps_blocks(dtype: torch.dtype, device: str | torch.device = "cpu") -> bool:
    """Whether layers computing in `dtype` on `device` run on the kernels' block formats, and so keep a
    quantized checkpoint's blocks (QuantizedLinear) until layout_linears packs them."""
    return torch.device(device).type == "cpu" and (dtype == torch.float32 and has("linear_f32")
                                                   or dtype == torch.bfloat16 and has("linear_bf16"))


def quantized_layers(model: nn.Module, state_dict: dict[str, Any]) -> dict[str, Any]:
    """The weights of `state_dict` still in a checkpoint's blocks (not tensors: gguf_blocks.QuantizedWeight)
    that fit an nn.Linear or nn.Embedding of `model`, by the layer's name: the ones keep_quantized keeps so."""
    found = {}
    for key, value in state_dict.items():
        name = key.removesuffix(".weight")
        if isinstance(value, torch.Tensor) or name == key:
            continue
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(module, (nn.Linear, nn.Embedding)) and tuple(module.weight.shape) == tuple(value.shape):
            found[name] = value
    return found


def keep_quantized(model: nn.Module, layers: dict[str, Any], dtype: torch.dtype) -> None:
    """Each named nn.Linear of `model` becomes a QuantizedLinear over the given blocks (its bias kept), each
    nn.Embedding a QuantizedEmbedding looking up `dtype` rows in a copy of them."""
    for name, blocks in layers.items():
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        module = getattr(owner, attr)
        if isinstance(module, nn.Embedding):
            setattr(owner, attr, QuantizedEmbedding(blocks.in_memory(), dtype))
        else:
            setattr(owner, attr, QuantizedLinear([blocks], module.bias))


def layout_linears(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Give every nn.Linear of a CPU model its layout for decoding, in place (see the module docstring).

    dtype: the dtype the layers compute in (default: each weight's own); float32 weights are cast
    to it here, so that bfloat16 layers can still read their block format from the float32 values.
    A QuantizedLinear is packed from its blocks where the kernels run `dtype` (default float32), else
    made dense first.
    """
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, QuantizedLinear):
                if keeps_blocks(dtype or torch.float32):
                    setattr(module, name, PackedLinear(child, dtype or torch.float32))
                    continue
                child = child.dense()
                setattr(module, name, child)
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

"""The kernels' weight layouts: dense matrices packed in blocks of 16 output columns, and the block
formats that keep a quantized checkpoint's float32 values in its GGUF Q4_1 / Q8_0 groups.

Pure PyTorch: packing runs once when a model is built; the products read these layouts (ops.py).
"""

from __future__ import annotations

import torch

def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) -> the kernels' layout: columns in blocks of 16, N padded to a multiple of 32.

    float32: (N/16, K, 16); bfloat16 and int8: (N/16, K/2, 16, 2), k in pairs (K must be even).
    """
    n, k = weight.shape
    padded = torch.zeros((n + 31) // 32 * 32, k, dtype=weight.dtype)
    padded[:n] = weight
    blocks = padded.view(-1, 16, k)
    if weight.dtype == torch.float32:
        return blocks.transpose(1, 2).contiguous()
    if k % 2:
        raise ValueError(f"pack_weight: {weight.dtype} needs an even number of input features, got {k}")
    return blocks.view(-1, 16, k // 2, 2).transpose(1, 2).contiguous()


def unpack_weight(packed: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of pack_weight (and of pack_blocks, for uint8 blocks laid out for `dtype`): (N, K)."""
    if packed.dtype == torch.uint8:
        return unpack_blocks(packed, n, dtype)
    if packed.dim() == 3:
        return packed.transpose(1, 2).reshape(-1, packed.shape[1])[:n]
    return packed.transpose(1, 2).reshape(-1, packed.shape[1] * 2)[:n]


# float32 weights in the block formats of csrc/blocks.h, named by their bytes per (16 columns x 32 k) group
GROUP = 32
Q4_GROUP_BYTES, Q8_GROUP_BYTES = 384, 576
_BLOCK_FORMATS = {Q4_GROUP_BYTES: 1, Q8_GROUP_BYTES: 2}  # csrc/nextok.h: FORMAT_Q4, FORMAT_Q8


def pack_blocks(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """A float32 (N, K) matrix in a block format of the kernels, where it holds its values exactly; else None.

    A checkpoint stored as GGUF Q4_1 or Q8_0 blocks is float32 after loading, but every group of 32
    weights along k of one row is still `q * scale + min` (Q4_1, q in 0..15) or `q * scale` (Q8_0,
    q in -127..127) with a float16 scale. The kernel widens such groups back to those float32 values
    in registers, so products over the blocks equal products over the dense matrix bit for bit while
    reading a fifth (Q4) or a quarter (Q8) of the bytes. Each group is recovered from its values and
    the whole matrix is checked bit for bit; a matrix with any group that does not fit stays dense.
    Returns uint8 (N/16, K/32, group bytes), N padded with zero rows to a multiple of 32.

    dtype: the dtype the product computes in. bfloat16 products widen the groups to the float32
    values rounded to bfloat16, which is what casting the dense matrix gives; their q bytes are
    ordered for the bfloat16 pair layout (csrc/products_bf16.h, widen_group_bf16).
    """
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"pack_blocks: products in {dtype} have no block format (float32 or bfloat16)")
    n, k = weight.shape
    if weight.dtype != torch.float32 or k % GROUP or not torch.isfinite(weight).all():
        return None
    rows = (n + 31) // 32 * 32
    groups = torch.zeros(rows, k, dtype=torch.float32)
    groups[:n] = weight
    groups = groups.view(rows, k // GROUP, GROUP)
    for signed in (False, True):
        if _fit(groups[:32], signed) is None:  # a first block of rows rules most formats out cheaply
            continue
        fit = _fit(groups, signed)
        if fit is not None:
            return _block_layout(*fit, interleaved=dtype == torch.bfloat16)
    return None


def _fit(groups: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """(q, scale, minimum or None) that give back every value of `groups` (rows, groups, 32) exactly, or None."""
    if signed:
        scale, minimum, top = _half(groups.abs().amax(-1) / 127), None, 127
    else:
        minimum = groups.amin(-1)
        scale, top = _half((groups.amax(-1) - minimum) / 15), 15
    if not torch.isfinite(scale).all():
        return None
    centred = groups if minimum is None else groups - minimum[..., None]
    q = torch.where(scale[..., None] > 0, centred / scale[..., None], torch.zeros(()))
    q = q.round().clamp(-top if signed else 0, top) + 0.0  # + 0.0: no -0.0, as the kernel's integers
    widened = q * scale[..., None] if minimum is None else q * scale[..., None] + minimum[..., None]
    return (q, scale, minimum) if torch.equal(widened.view(torch.int32), groups.view(torch.int32)) else None


def _half(v: torch.Tensor) -> torch.Tensor:
    """v rounded to float16 precision (the block scales are float16 values, so q * scale is exact)."""
    return v.to(torch.float16).float()


def _block_layout(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None,
                  interleaved: bool) -> torch.Tensor:
    rows, n_groups, _ = q.shape

    def per_block(v: torch.Tensor) -> torch.Tensor:  # (rows, groups) float32 -> (rows/16, groups, 64) bytes
        return v.view(rows // 16, 16, n_groups).transpose(1, 2).contiguous().view(torch.uint8)

    parts = [per_block(scale)]
    if minimum is not None:
        parts.append(per_block(minimum))
    # (blocks, groups, 16 pairs, lo | hi, 16 lanes): which q each byte (Q4: each nibble) of a pair holds
    steps = q.view(rows // 16, 16, n_groups, GROUP // 2, 2).permute(0, 2, 3, 4, 1)  # (..., step in pair, column)
    if interleaved:  # lo: columns 0-7, hi: 8-15, lane i = column i // 2 at step i % 2
        halves = steps.reshape(*steps.shape[:3], 2, 2, 8).permute(0, 1, 2, 4, 5, 3)  # (..., half, column, step)
        lanes = halves.reshape(*steps.shape[:3], 2, 16)
    else:  # lo: step 2p, hi: step 2p + 1, lane j = column j
        lanes = steps
    if minimum is not None:
        nibbles = lanes.to(torch.uint8)
        parts.append((nibbles[..., 0, :] | (nibbles[..., 1, :] << 4)).reshape(rows // 16, n_groups, -1))
    else:
        parts.append(lanes.to(torch.int8).reshape(rows // 16, n_groups, -1).view(torch.uint8))
    return torch.cat(parts, dim=-1).contiguous()


def unpack_blocks(packed: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of pack_blocks(weight, dtype): the (N, K) matrix of `dtype`."""
    blocks, n_groups, size = packed.shape
    scale = packed[..., :64].contiguous().view(torch.float32)  # (blocks, groups, 16 columns)
    if size == Q4_GROUP_BYTES:
        minimum = packed[..., 64:128].contiguous().view(torch.float32)
        pairs = packed[..., 128:].reshape(blocks, n_groups, GROUP // 2, 16)
        lanes = torch.stack((pairs & 15, pairs >> 4), dim=3).float()  # (blocks, groups, 16 pairs, lo | hi, 16)
    else:
        lanes = packed[..., 64:].contiguous().view(torch.int8).reshape(blocks, n_groups, GROUP // 2, 2, 16).float()
    if dtype == torch.bfloat16:  # (..., half, column, step) back to (..., step, column)
        lanes = lanes.reshape(blocks, n_groups, GROUP // 2, 2, 8, 2).permute(0, 1, 2, 5, 3, 4)
    q = lanes.reshape(blocks, n_groups, GROUP, 16)  # (blocks, groups, k, column)
    w = q * scale[:, :, None]
    if size == Q4_GROUP_BYTES:
        w = w + minimum[:, :, None]
    return w.permute(0, 3, 1, 2).reshape(blocks * 16, n_groups * GROUP)[:n].to(dtype)



def block_format(packed: torch.Tensor) -> int:
    """The kernels' code for a packed matrix: 0 dense, else its block format (uint8 blocks)."""
    return _BLOCK_FORMATS[packed.shape[-1]] if packed.dtype == torch.uint8 else 0

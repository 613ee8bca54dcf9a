"""The kernels' weight layouts: dense matrices packed in blocks of 16 output columns, and the block
formats that keep a quantized checkpoint's float32 values in its groups (GGUF Q4_0 ... Q6_K).

Pure PyTorch: packing runs once when a model is built; the products read these layouts (ops.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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
# (Q4K, Q8K: a super-block of 8 groups over 8)
GROUP, SUPER = 32, 256
FORMAT_Q4, FORMAT_Q8, FORMAT_Q8X, FORMAT_Q4K, FORMAT_Q8K = 1, 2, 3, 4, 5  # csrc/nextok.h
GROUP_BYTES = {FORMAT_Q4: 384, FORMAT_Q8: 576, FORMAT_Q8X: 768, FORMAT_Q4K: 296, FORMAT_Q8K: 584}
Q4_GROUP_BYTES, Q8_GROUP_BYTES, Q8X_GROUP_BYTES = GROUP_BYTES[FORMAT_Q4], GROUP_BYTES[FORMAT_Q8], GROUP_BYTES[FORMAT_Q8X]
_BLOCK_FORMATS = {size: fmt for fmt, size in GROUP_BYTES.items()}
_K_FORMATS = {FORMAT_Q4K: FORMAT_Q4, FORMAT_Q8K: FORMAT_Q8X}  # each K-quant format and the one with its q bytes


def common_format(formats: set[int]) -> int:
    """The smallest block format that holds groups of all of `formats`: theirs where they agree, Q8K for
    K-quants, Q4 for Q4K with Q4 (float32 scales), else Q8X (which holds every format)."""
    if len(formats) == 1:
        return next(iter(formats))
    if formats <= set(_K_FORMATS):
        return FORMAT_Q8K
    bases = {_K_FORMATS.get(f, f) for f in formats}
    return bases.pop() if len(bases) == 1 else FORMAT_Q8X


@dataclass(frozen=True)
class SuperScales:
    """What a K-quant (Q4_K, Q5_K, Q6_K) stores of its groups' scales and minimums: per 256 k a float16 `d`
    and `dmin`, per group small integers `sc` and `m`, with scale == d * sc and minimum == -(dmin * m), both
    exact float32 products. The FORMAT_Q4K / FORMAT_Q8K kernels read these instead of float32 scales."""

    d: torch.Tensor  # (N, K // 256) float32 holding float16 values
    dmin: torch.Tensor  # (N, K // 256) float32 holding float16 values (0 where the type has no minimum)
    sc: torch.Tensor  # (N, K // size) int16: 0..63 (Q4_K, Q5_K) or -128..127 (Q6_K)
    m: torch.Tensor  # (N, K // size) int16: 0..63 (0 where the type has no minimum)

    @staticmethod
    def cat(parts: list[SuperScales]) -> SuperScales:
        return SuperScales(*(torch.cat([getattr(p, f) for p in parts]) for f in ("d", "dmin", "sc", "m")))

    def halved(self) -> SuperScales:
        """The same with sc and m given per 16 k (each twice) instead of per 32."""
        return SuperScales(self.d, self.dmin, self.sc.repeat_interleave(2, dim=1), self.m.repeat_interleave(2, dim=1))


@dataclass
class Groups:
    """An (N, K) matrix in groups along k that share a scale and a minimum, as quantized checkpoints store it.

    w[n, k] = q[n, k] * scale[n, k // size] + minimum[n, k // size] with one rounding (an FMA), or
    q * scale without a minimum. GGUF's dequantization computes its types' values just so (their
    q * scale is exact in float32), which is what lets the kernels widen them back bit for bit.
    `format` names the block format that holds them: FORMAT_Q4 (size 32, a minimum, q in 0..15),
    FORMAT_Q8 (size 32, no minimum) or FORMAT_Q8X (any of them, and size 16).
    """

    q: torch.Tensor  # (N, K) int8
    scale: torch.Tensor  # (N, K // size) float32
    minimum: torch.Tensor | None  # (N, K // size) float32
    size: int  # weights along k per scale: 32 or 16
    format: int
    factors: SuperScales | None = None  # K-quants: the scales' float16 and integer factors

    @staticmethod
    def cat(parts: list[Groups], fmt: int | None = None) -> Groups:
        """The rows of `parts` one after another in format `fmt` (default: common_format of theirs)."""
        formats = {part.format for part in parts}
        fmt = fmt or common_format(formats)
        parts = [part.held_in(fmt) for part in parts]
        first = parts[0]
        if len(parts) == 1:
            return first
        minimum = None if first.minimum is None else torch.cat([part.minimum for part in parts])
        factors = None if first.factors is None else SuperScales.cat([part.factors for part in parts])
        return Groups(torch.cat([part.q for part in parts]), torch.cat([part.scale for part in parts]), minimum,
                      first.size, first.format, factors)

    def held_in(self, fmt: int) -> Groups:
        """The same weights as groups of format `fmt` (ValueError where that format cannot hold them)."""
        if fmt in (FORMAT_Q8X, FORMAT_Q8K):
            return self.widened(fmt)
        if fmt == self.format:
            return self
        if _K_FORMATS.get(self.format) == fmt:  # a K-quant's float32 scales are all FORMAT_Q4 needs
            return Groups(self.q, self.scale, self.minimum, self.size, fmt)
        raise ValueError(f"Groups.held_in: format {self.format} groups do not fit format {fmt}")

    def widened(self, fmt: int = FORMAT_Q8X) -> Groups:
        """The same weights with a scale and a minimum per 16 along k, which every format holds, in FORMAT_Q8X
        (float32 scales) or FORMAT_Q8K (a K-quant's factors kept)."""
        if fmt == FORMAT_Q8K and self.factors is None:
            raise ValueError(f"Groups.widened: format {self.format} groups have no K-quant factors for FORMAT_Q8K")
        scale = self.scale if self.size == 16 else self.scale.repeat_interleave(2, dim=1)
        if self.minimum is None:
            minimum = torch.zeros_like(scale)
        else:
            minimum = self.minimum if self.size == 16 else self.minimum.repeat_interleave(2, dim=1)
        factors = None
        if fmt == FORMAT_Q8K:
            factors = self.factors if self.size == 16 else self.factors.halved()
        return Groups(self.q, scale, minimum, 16, fmt, factors)


def pack_groups(groups: Groups, dtype: torch.dtype = torch.float32,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """`groups` in its block format, laid out for products in `dtype` (float32 or bfloat16).

    Returns uint8 (N/16, K/32, group bytes), N padded with zero rows to a multiple of 32 (written into
    `out` where given). bfloat16 products widen the groups to their float32 values rounded to bfloat16;
    their q bytes are ordered for the bfloat16 pair layout (csrc/products_bf16.h, widen_group_bf16).
    """
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"pack_groups: products in {dtype} have no block format (float32 or bfloat16)")
    if groups.format in _K_FORMATS:
        return _pack_super_blocks(groups, dtype, out)
    if groups.format == FORMAT_Q8X and (groups.size != 16 or groups.minimum is None):
        groups = groups.widened()
    n, k = groups.q.shape
    n_groups, blocks = k // GROUP, (n + 31) // 32 * 2
    if out is None:
        out = torch.empty(blocks, n_groups, GROUP_BYTES[groups.format], dtype=torch.uint8)
    if out.shape != (blocks, n_groups, GROUP_BYTES[groups.format]) or not out.is_contiguous():
        raise ValueError(f"pack_groups: out {tuple(out.shape)} does not fit {n} x {k} weights (format {groups.format})")
    o = out.numpy()  # numpy's strided loops write every part straight into its place
    values = [groups.scale] + ([] if groups.minimum is None else [groups.minimum])
    halves = 2 if groups.format == FORMAT_Q8X else 1  # scales (and minimums) per group and column
    for i, v in enumerate(values):  # (rows, groups * halves) -> per block and group: [half][column] float32
        head = o[..., 64 * halves * i:64 * halves * (i + 1)].view(np.float32)
        _fill(_split(head, (blocks, n_groups, halves, 16)), v.numpy(), n, (blocks, 16, n_groups, halves), (0, 2, 3, 1))
    # Steps 2p and 2p + 1 of a row move together (one uint16) into `staged`: (blocks, groups, pair, lanes)
    q = groups.q.numpy().view(np.uint16)
    q_bytes = o[..., 64 * halves * len(values):]
    if dtype == torch.bfloat16:  # lo: columns 0-7, hi: 8-15; byte 2 (c % 8) + s of each holds column c at step s
        source, order, lanes = (blocks, 2, 8, n_groups, GROUP // 2), (0, 3, 4, 1, 2), (2, 8)
        if groups.format != FORMAT_Q4:  # the pair layout is the staged one
            _fill(_split(q_bytes.view(np.uint16), (blocks, n_groups, GROUP // 2, *lanes)), q, n, source, order)
            return out
    else:  # byte j of lo holds column j at step 2p, of hi at step 2p + 1
        source, order, lanes = (blocks, 16, n_groups, GROUP // 2), (0, 2, 3, 1), (16,)
    staged = np.empty((blocks, n_groups, GROUP // 2, *lanes), np.uint16)
    _fill(staged, q, n, source, order)
    if dtype == torch.bfloat16:  # Q4: byte = lo | hi << 4, in both bytes of a unit
        np.left_shift(staged[:, :, :, 1], 4, out=staged[:, :, :, 1])
        np.bitwise_or(staged[:, :, :, 0], staged[:, :, :, 1],
                      out=_split(q_bytes.view(np.uint16), (blocks, n_groups, GROUP // 2, 8)))
    elif groups.format == FORMAT_Q4:  # byte j = q[2p][j] | q[2p + 1][j] << 4: the unit's two nibbles
        nibbles = (staged >> 4) & 0xF0
        nibbles |= staged & 0x0F
        np.copyto(_split(q_bytes, (blocks, n_groups, GROUP // 2, 16)), nibbles, casting="unsafe")
    else:  # the units' low bytes (step 2p), then their high bytes
        units = staged.view(np.uint8).reshape(blocks, n_groups, GROUP // 2, 16, 2)
        np.copyto(_split(q_bytes, (blocks, n_groups, GROUP // 2, 2, 16)), units.transpose(0, 1, 2, 4, 3))
    return out


def _pack_super_blocks(groups: Groups, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    """pack_groups for FORMAT_Q4K / FORMAT_Q8K: per column block and 256 k, d[16] and -dmin[16] as float16,
    then per group sc and m (Q8K: per half) and the q bytes the format's FORMAT_Q4 / FORMAT_Q8X would hold."""
    fmt = groups.format
    if groups.factors is None or (groups.minimum is None and fmt == FORMAT_Q4K):
        raise ValueError(f"pack_groups: format {fmt} needs groups with K-quant factors (gguf_blocks.decode gives them)")
    if fmt == FORMAT_Q8K and groups.size != 16:
        groups = groups.widened(FORMAT_Q8K)
    n, k = groups.q.shape
    if k % SUPER:
        raise ValueError(f"pack_groups: format {fmt} needs k a multiple of {SUPER}, not {k}")
    n_groups, n_super, blocks = k // GROUP, k // SUPER, (n + 31) // 32 * 2
    if out is None:
        out = torch.empty(blocks, n_groups, GROUP_BYTES[fmt], dtype=torch.uint8)
    if out.shape != (blocks, n_groups, GROUP_BYTES[fmt]) or not out.is_contiguous():
        raise ValueError(f"pack_groups: out {tuple(out.shape)} does not fit {n} x {k} weights (format {fmt})")
    base = pack_groups(Groups(groups.q, groups.scale, groups.minimum, groups.size, _K_FORMATS[fmt]), dtype).numpy()
    q_bytes = base[..., base.shape[-1] - (256 if fmt == FORMAT_Q4K else 512):]  # (blocks, groups, q bytes)
    halves, f = GROUP // groups.size, groups.factors  # sc and m per group and column
    o = out.numpy().reshape(blocks, n_super, 8 * GROUP_BYTES[fmt])
    for at, v in ((0, f.d), (32, -f.dmin)):  # (rows, super-blocks) -> per block and super-block: [column] float16
        _fill(o[..., at:at + 32].view(np.float16), v.numpy().astype(np.float16), n, (blocks, 16, n_super), (0, 2, 1))
    per_group = _split(o[..., 64:], (blocks, n_super, 8, GROUP_BYTES[fmt] - 8))  # 8 bytes a group went to d, dmin
    s = 16 * halves
    sc_type = np.int8 if fmt == FORMAT_Q8K else np.uint8
    for at, v, t in ((0, f.sc, sc_type), (s, f.m, np.uint8)):  # (rows, groups * halves) -> [half][column]
        _fill(_split(per_group[..., at:at + s].view(t), (blocks, n_super, 8, halves, 16)), v.numpy().astype(t), n,
              (blocks, 16, n_super, 8, halves), (0, 2, 3, 4, 1))
    np.copyto(per_group[..., 2 * s:], q_bytes.reshape(blocks, n_super, 8, -1))
    return out


def _unpack_super_blocks(packed: torch.Tensor) -> torch.Tensor:
    """A FORMAT_Q4K / FORMAT_Q8K matrix in the FORMAT_Q4 / FORMAT_Q8X layout of the same values."""
    blocks, n_groups, size = packed.shape
    fmt = _BLOCK_FORMATS[size]
    n_super, halves = n_groups // 8, 2 if fmt == FORMAT_Q8K else 1
    o = packed.numpy().reshape(blocks, n_super, 8 * size)
    d, neg_dmin = (o[..., at:at + 32].view(np.float16).astype(np.float32)[:, :, None, None, :] for at in (0, 32))
    per_group = o[..., 64:].reshape(blocks, n_super, 8, -1)
    s = 16 * halves
    sc = per_group[..., :s].view(np.int8 if fmt == FORMAT_Q8K else np.uint8).reshape(blocks, n_super, 8, halves, 16)
    m = per_group[..., s:2 * s].reshape(blocks, n_super, 8, halves, 16)
    scale, minimum = d * sc.astype(np.float32), neg_dmin * m.astype(np.float32)
    head = [v.reshape(blocks, n_groups, -1).view(np.uint8) for v in (scale, minimum)]
    q_bytes = per_group[..., 2 * s:].reshape(blocks, n_groups, -1)
    return torch.from_numpy(np.concatenate([*head, q_bytes], axis=-1))


def _split(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A view of `a` in `shape`, its contiguous last axis split; never a copy, which writes would miss."""
    assert a.strides[-1] == a.itemsize and np.prod(shape[a.ndim - 1:]) == a.shape[-1]
    strides = [a.itemsize]
    for size in reversed(shape[a.ndim:]):
        strides.insert(0, strides[0] * size)
    return np.lib.stride_tricks.as_strided(a, shape, a.strides[:-1] + tuple(strides))


def _fill(dst: np.ndarray, src: np.ndarray, n: int, shape: tuple[int, ...], order: tuple[int, ...]) -> None:
    """dst = src (n rows, padded with zero rows to 16 per column block) viewed as `shape`, transposed to `order`."""
    rows = shape[0] * 16
    if n != rows:
        padded = np.zeros((rows, *src.shape[1:]), src.dtype)
        padded[:n] = src
        src = padded
    np.copyto(dst, src.reshape(shape).transpose(order))


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
            q, scale, minimum = fit
            return pack_groups(Groups(q.view(rows, k).to(torch.int8), scale, minimum, GROUP,
                                      FORMAT_Q8 if minimum is None else FORMAT_Q4), dtype)
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


def unpack_blocks(packed: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of pack_groups(groups, dtype) (and of pack_blocks): the (N, K) matrix of `dtype`.

    Computes q * scale + minimum in float32, which is the kernels' FMA wherever q * scale is exact
    (every GGUF type) or the minimum is 0.
    """
    if _BLOCK_FORMATS[packed.shape[-1]] in _K_FORMATS:
        packed = _unpack_super_blocks(packed)
    blocks, n_groups, size = packed.shape
    fmt = _BLOCK_FORMATS[size]
    halves = 2 if fmt == FORMAT_Q8X else 1  # scales (and minimums) per group and column
    head = 64 * halves
    scale = packed[..., :head].contiguous().view(torch.float32).view(blocks, n_groups, halves, 16)
    minimum = None
    if fmt != FORMAT_Q8:
        minimum = packed[..., head:2 * head].contiguous().view(torch.float32).view(blocks, n_groups, halves, 16)
    if fmt == FORMAT_Q4:
        pairs = packed[..., 2 * head:].reshape(blocks, n_groups, GROUP // 2, 16)
        lanes = torch.stack((pairs & 15, pairs >> 4), dim=3).float()  # (blocks, groups, 16 pairs, lo | hi, 16)
    else:
        q_bytes = packed[..., (head if fmt == FORMAT_Q8 else 2 * head):].contiguous()
        lanes = q_bytes.view(torch.int8).reshape(blocks, n_groups, GROUP // 2, 2, 16).float()
    if dtype == torch.bfloat16:  # (..., half, column, step) back to (..., step, column)
        lanes = lanes.reshape(blocks, n_groups, GROUP // 2, 2, 8, 2).permute(0, 1, 2, 5, 3, 4)
    q = lanes.reshape(blocks, n_groups, halves, GROUP // halves, 16)  # (blocks, groups, half, k, column)
    w = q * scale[:, :, :, None]
    if minimum is not None:
        w = w + minimum[:, :, :, None]
    return w.permute(0, 4, 1, 2, 3).reshape(blocks * 16, n_groups * GROUP)[:n].to(dtype)


def block_format(packed: torch.Tensor) -> int:
    """The kernels' code for a packed matrix: 0 dense, else its block format (uint8 blocks)."""
    return _BLOCK_FORMATS[packed.shape[-1]] if packed.dtype == torch.uint8 else 0

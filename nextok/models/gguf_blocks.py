"""GGUF tensors as arrays: dense float32, or read straight from their quantized blocks into the groups
the CPU kernels keep (packing.Groups), with no dense matrix in between.

Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K store every 32 weights of a row (Q6_K: every 16) as
integers q with a scale and a minimum. `decode` computes that float32 scale and minimum exactly as
`gguf.quants.dequantize` computes them (Q4_K: d * sc and dmin * m, each a float32 product), and since
q * scale is exact in float32, GGUF's value `q * scale + minimum` (rounded once) is the kernels'
fma(q, scale, minimum): products over the groups equal the products over the dequantized matrix
bit for bit. Q4_0 becomes q * d - 8d; Q5_0 the signed q - 16 with d; Q6_K the signed q - 32.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize

from nextok.kernels.packing import FORMAT_Q4, FORMAT_Q4K, FORMAT_Q8, FORMAT_Q8K, FORMAT_Q8X, Groups, SuperScales

# The quantization types read as groups, and the block format each fits alone.
BLOCK_TYPES: dict[Q, int] = {Q.Q4_0: FORMAT_Q4, Q.Q4_1: FORMAT_Q4, Q.Q4_K: FORMAT_Q4K, Q.Q8_0: FORMAT_Q8,
                             Q.Q5_0: FORMAT_Q8, Q.Q5_1: FORMAT_Q8X, Q.Q5_K: FORMAT_Q8K, Q.Q6_K: FORMAT_Q8K}


@dataclass(frozen=True)
class QuantizedWeight:
    """An (N, K) weight still in a GGUF file's blocks: `raw` (N, bytes per row), one row of blocks per output.

    raw is a view of the memory-mapped file (or rows reordered from it): it costs no memory until read.
    """

    raw: np.ndarray
    qtype: Q
    shape: tuple[int, int]

    @property
    def format(self) -> int:
        """The block format these groups fit alone (packing.FORMAT_*)."""
        return BLOCK_TYPES[self.qtype]

    def groups(self, start: int = 0, stop: int | None = None) -> Groups | None:
        """Rows start..stop as groups, or None where a scale or minimum is not finite (no format holds them)."""
        return decode(self.raw[start:stop], self.qtype)

    def dequantize(self) -> torch.Tensor:
        """The float32 (N, K) matrix, as gguf.quants.dequantize gives it."""
        return torch.from_numpy(dequantize_rows(self.raw, self.qtype, self.shape))

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows `rows` (int64, any shape) of the float32 matrix, dequantized alone: (*rows.shape, K)."""
        index = rows.reshape(-1).numpy()
        values = dequantize_rows(self.raw[index], self.qtype, (len(index), self.shape[1]))
        return torch.from_numpy(values).view(*rows.shape, self.shape[1])

    def drop_pages(self) -> None:
        """Lets the OS take back the file's pages these blocks were read from (see `drop_pages`)."""
        drop_pages(self.raw)

    def in_memory(self) -> QuantizedWeight:
        """The same weight with its blocks copied out of the file (which may then change or go)."""
        return QuantizedWeight(np.array(self.raw), self.qtype, self.shape)


def drop_pages(raw: np.ndarray) -> None:
    """Gives back to the OS the pages of the memory-mapped file that `raw` (a view of it) has read: once a
    matrix is packed, its blocks need not count in the process's memory while the next ones load. The
    pages stay in the page cache, and a later read maps them again. Arrays not backed by a map: nothing."""
    base = raw
    while isinstance(base, np.ndarray) and not isinstance(base.base, mmap.mmap):
        base = base.base
    if not isinstance(base, np.memmap) or base.offset != 0 or not raw.size:
        return
    start = raw.__array_interface__["data"][0] - base.__array_interface__["data"][0]
    end = start + raw.nbytes if raw.flags.c_contiguous else base.nbytes
    lo, hi = start // mmap.PAGESIZE * mmap.PAGESIZE, min(-(-end // mmap.PAGESIZE) * mmap.PAGESIZE, len(base.base))
    if hasattr(base.base, "madvise") and hi > lo:
        base.base.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def decode(raw: np.ndarray, qtype: Q) -> Groups | None:
    """Rows of GGUF blocks of `qtype`, raw (N, bytes per row) uint8, as packing.Groups (None: a scale is not finite)."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    n = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(-1, type_size)  # (blocks, bytes a block)
    with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 and the like: refused below
        q, scale, minimum, *factors = _DECODERS[qtype](b)
        finite = np.isfinite(scale).all() and (minimum is None or np.isfinite(minimum).all())
    if not finite:  # (then d and dmin are finite too: an infinite one gives an infinite or NaN product)
        return None
    size = block // scale.shape[1]
    minimum = None if minimum is None else torch.from_numpy(minimum.reshape(n, -1))
    super_scales = None
    if factors:  # a K-quant: d, dmin (blocks, 1) and sc, m (blocks, groups of a block)
        super_scales = SuperScales(*(torch.from_numpy(np.ascontiguousarray(f).reshape(n, -1)) for f in factors))
    return Groups(torch.from_numpy(q.reshape(n, -1)), torch.from_numpy(scale.reshape(n, -1)), minimum, size,
                  BLOCK_TYPES[qtype], super_scales)


def _f16(b: np.ndarray, at: int) -> np.ndarray:
    """(blocks, 1) float32 of the float16 at byte `at` of every block."""
    return np.ascontiguousarray(b[:, at:at + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(blocks, m, w) bytes -> (blocks, m, 2, w) int8: per w bytes, their low nibbles, then their high ones."""
    q = np.empty((*qs.shape[:2], 2, qs.shape[2]), np.uint8)
    np.bitwise_and(qs, 15, out=q[:, :, 0])
    np.right_shift(qs, 4, out=q[:, :, 1])
    return q.view(np.int8)


def _add_high(q: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """q | bits << 4, in place (bits: 0..3, shaped like q)."""
    np.left_shift(bits, 4, out=bits)
    np.bitwise_or(q, bits.view(np.int8), out=q)
    return q


def _q4_0(b):
    d = _f16(b, 0)
    return _nibbles(b[:, None, 2:18]), d, d * np.float32(-8)  # d (q - 8) = q d - 8d, both exact


def _q4_1(b):
    return _nibbles(b[:, None, 4:20]), _f16(b, 0), _f16(b, 2)


def _q8_0(b):
    return np.ascontiguousarray(b[:, 2:34]).view(np.int8), _f16(b, 0), None


def _q5(b, at: int) -> np.ndarray:
    """Q5_0 / Q5_1: 32 values of 5 bits: the high bits in the 4 bytes at `at` (bit j: value j), then nibbles."""
    high = np.unpackbits(b[:, at:at + 4], axis=1, bitorder="little")  # (blocks, 32)
    return _add_high(_nibbles(b[:, None, at + 4:at + 20]).reshape(-1, 32), high)


def _q5_0(b):
    q = _q5(b, 2)
    q -= 16
    return q, _f16(b, 0), None


def _q5_1(b):
    return _q5(b, 4), _f16(b, 0), _f16(b, 2)


def _scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: the 6-bit scales and minimums of the 8 sub-blocks, packed in 12 bytes (gguf's get_scale_min)."""
    d, m, m_d = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_scales(b: np.ndarray) -> tuple[np.ndarray, ...]:
    """Q4_K / Q5_K: scale d sc and minimum -(dmin m) of the 8 sub-blocks (value = (d sc) q - dmin m), then
    their factors d, dmin, sc, m."""
    sc, mn = _scale_min(b[:, 4:16])
    d, dmin = _f16(b, 0), _f16(b, 2)
    return d * sc, -(dmin * mn), d, dmin, sc.astype(np.int16), mn.astype(np.int16)


def _q4_k(b):
    return (_nibbles(b[:, 16:144].reshape(-1, 4, 32)), *_k_scales(b))  # sub-blocks 2j, 2j + 1: nibbles of bytes 32j..


def _q5_k(b):
    high = np.unpackbits(b[:, 16:48], axis=1, bitorder="little").reshape(-1, 32, 8)  # bit i of byte e:
    high = np.ascontiguousarray(high.transpose(0, 2, 1)).reshape(-1, 4, 2, 32)  # sub-block i, element e
    return (_add_high(_nibbles(b[:, 48:176].reshape(-1, 4, 32)), high), *_k_scales(b))


def _q6_k(b):
    q = _nibbles(b[:, 0:128].reshape(-1, 2, 64))  # element 128 h + 64 i + e: nibble i of byte 64 h + e
    qh = b[:, 128:192].reshape(-1, 2, 1, 32)
    high = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3  # 128 h + 32 s + e: bits 2s of 32 h + e
    q = _add_high(q.reshape(-1, 2, 4, 32), high)
    q -= 32
    d, sc = _f16(b, 208), b[:, 192:208].view(np.int8).astype(np.int16)  # 16 sub-blocks of 16, no minimum
    return q, d * sc.astype(np.float32), None, d, np.zeros_like(d), sc, np.zeros_like(sc)


_DECODERS = {Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q8_0: _q8_0, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1, Q.Q4_K: _q4_k,
             Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}


def dequantize_rows(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> np.ndarray:
    """GGUF data of `qtype` as a new float32 array of `shape` (a copy, never the mmap).

    Vectorised numpy for F32, F16, BF16, Q8_0, Q4_0 and Q4_1, `gguf.quants.dequantize` for the rest;
    NotImplementedError for a type gguf cannot dequantize.
    """
    raw = raw.view(np.uint8)
    if qtype == Q.F32:
        return raw.view(np.float32).reshape(shape).copy()
    if qtype == Q.F16:
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    if qtype == Q.BF16:  # bfloat16 is the top half of a float32
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1):
        blocks = raw.reshape(-1, GGML_QUANT_SIZES[qtype][1])  # (n_blocks, bytes per block)
        d = _f16_np(blocks[:, 0:2])  # (n_blocks, 1) scale
        if qtype == Q.Q8_0:
            return (blocks[:, 2:].view(np.int8).astype(np.float32) * d).reshape(shape)  # 32 int8 a block
        packed = blocks[:, 4:] if qtype == Q.Q4_1 else blocks[:, 2:]  # (n_blocks, 16): two 4-bit values a byte
        q = np.empty((blocks.shape[0], 32), np.uint8)
        np.bitwise_and(packed, 0x0F, out=q[:, :16])  # low nibbles are elements 0..15
        np.right_shift(packed, 4, out=q[:, 16:])
        if qtype == Q.Q4_0:
            return ((q.view(np.int8) - np.int8(8)).astype(np.float32) * d).reshape(shape)
        return (q.astype(np.float32) * d + _f16_np(blocks[:, 2:4])).reshape(shape)  # Q4_1: d * q + min
    if qtype in BLOCK_TYPES and (values := _dequantize_groups(raw, qtype, shape)) is not None:
        return values
    return np.array(gguf_dequantize(raw, qtype), dtype=np.float32).reshape(shape)


def _dequantize_groups(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> np.ndarray | None:
    """q * scale (+ minimum) from the decoded groups, a few million weights at a time: gguf's float32
    operations, so its very bits, several times faster. None where a scale is not finite."""
    k = shape[-1]
    rows = raw.reshape(-1, k // GGML_QUANT_SIZES[qtype][0] * GGML_QUANT_SIZES[qtype][1])
    out = np.empty((len(rows), k), np.float32)
    window = max(1, (1 << 22) // k)
    for start in range(0, len(rows), window):
        groups = decode(rows[start:start + window], qtype)
        if groups is None:
            return None
        values = out[start:start + window].reshape(len(groups.q), -1, groups.size)
        np.multiply(groups.q.numpy().reshape(values.shape), groups.scale.numpy()[..., None], out=values)
        if groups.minimum is not None:
            np.add(values, groups.minimum.numpy()[..., None], out=values)
    return out.reshape(shape)


def _f16_np(pairs: np.ndarray) -> np.ndarray:
    """(n, 2) bytes -> (n, 1) float32 of the little-endian float16 they hold."""
    return np.ascontiguousarray(pairs).view(np.float16).astype(np.float32)

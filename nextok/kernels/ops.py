"""The model ops that have a hand-written CPU kernel, each with its PyTorch formula as the fallback.

An op takes the kernel when the library is loaded, the tensors are contiguous CPU float32 or
bfloat16 tensors of the shapes the kernel handles, and no torch.compile trace is running;
otherwise it computes the same result with PyTorch ops. Every op's kernel path is tested
against its fallback (tests/kernels/test_ops.py).
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from nextok.kernels import library

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _kernels(*tensors: torch.Tensor | None) -> ctypes.CDLL | None:
    """The library, if every given tensor suits a kernel (CPU, contiguous) and nothing is compiling."""
    lib = library()
    if lib is None or torch.compiler.is_compiling():
        return None
    for t in tensors:
        if t is not None and (t.device.type != "cpu" or not t.is_contiguous()):
            return None
    return lib


# ------------------------------------------------------------------------------ packed products
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


# float32 weights in the block formats of cpu_kernels.c, named by their bytes per (16 columns x 32 k) group
GROUP = 32
Q4_GROUP_BYTES, Q8_GROUP_BYTES = 384, 576
_BLOCK_FORMATS = {Q4_GROUP_BYTES: 1, Q8_GROUP_BYTES: 2}  # cpu_kernels.c: F32_Q4, F32_Q8


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
    ordered for the bfloat16 pair layout (cpu_kernels.c, widen_group_bf16).
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


def packed_linear(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None = None,
                  scale: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ W^T (+ bias) with W (N, K) given packed; int8 weights need `scale` (N,) float32.

    float32 and bfloat16 weights (packed densely, or uint8 blocks laid out for that dtype by
    pack_blocks) take x of their dtype; int8 weights take bfloat16 x.
    """
    lib = library()
    if lib is None:
        raise RuntimeError("packed_linear needs nextok's CPU kernels (see nextok.kernels)")
    k = x.shape[-1]
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
    args = (x.numel() // k, k, n, torch.get_num_threads())
    if packed.dtype == torch.int8:
        lib.linear_int8(x.data_ptr(), packed.data_ptr(), scale.data_ptr(), _ptr(bias), y.data_ptr(), *args)
    elif x.dtype == torch.float32:
        lib.linear_f32(x.data_ptr(), packed.data_ptr(), block_format(packed), _ptr(bias), y.data_ptr(), *args)
    else:
        lib.linear_bf16(x.data_ptr(), packed.data_ptr(), block_format(packed), _ptr(bias), y.data_ptr(), *args)
    return y


def block_format(packed: torch.Tensor) -> int:
    """The kernels' code for a packed matrix: 0 dense, else its block format (uint8 blocks)."""
    return _BLOCK_FORMATS[packed.shape[-1]] if packed.dtype == torch.uint8 else 0


# ------------------------------------------------------------------------------ element-wise
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    lib = _kernels(x, weight)
    if lib is None or x.dtype not in _SUFFIX or weight.dtype != x.dtype:
        return torch.rms_norm(x, weight.shape, weight, eps)
    out = torch.empty_like(x)
    getattr(lib, f"rms_norm_{_SUFFIX[x.dtype]}")(x.data_ptr(), None, weight.data_ptr(), out.data_ptr(),
                                                 x.numel() // x.shape[-1], x.shape[-1], eps)
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + x, rms_norm(residual + x)); the kernel adds into `residual` in place."""
    lib = _kernels(x, residual, weight)
    if lib is None or x.dtype not in _SUFFIX or not (weight.dtype == residual.dtype == x.dtype):
        total = residual + x
        return total, torch.rms_norm(total, weight.shape, weight, eps)
    out = torch.empty_like(x)
    getattr(lib, f"rms_norm_{_SUFFIX[x.dtype]}")(x.data_ptr(), residual.data_ptr(), weight.data_ptr(),
                                                 out.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], eps)
    return residual, out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (..., 2I) -> silu(gate) * up (..., I): the SwiGLU activation."""
    inner = gate_up.shape[-1] // 2
    lib = _kernels(gate_up)
    if lib is None or gate_up.dtype not in _SUFFIX:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    out = torch.empty(*gate_up.shape[:-1], inner, dtype=gate_up.dtype)
    getattr(lib, f"silu_mul_{_SUFFIX[gate_up.dtype]}")(gate_up.data_ptr(), out.data_ptr(),
                                                       gate_up.numel() // gate_up.shape[-1], inner)
    return out


def rotate(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_rotated: int,
           kv: tuple[torch.Tensor, torch.Tensor] | None = None,
           slots: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
    """Rotary embedding (rotate-half) on the first `n_rotated` heads of qkv (N, heads, D).

    cos, sin: (N, D) float32. The heads after the rotated ones are values, as many as the keys.
    Given the layer's KV cache and each token's flat slot, the kernel also writes k and v there.
    Returns (qkv rotated, whether k and v were written); the kernel rotates in place.
    """
    n, heads, dim = qkv.shape
    k_cache, v_cache = kv if kv is not None and slots is not None else (None, None)
    lib = _kernels(qkv, cos, sin, k_cache, v_cache, slots)
    if (lib is None or qkv.dtype not in _SUFFIX or dim % 2 or cos.dtype != torch.float32
            or (k_cache is not None and (k_cache.dtype != qkv.dtype or slots.dtype != torch.int64))):
        return _rotate_torch(qkv, cos, sin, n_rotated), False
    n_kv = heads - n_rotated  # the kernel takes the query and kv head counts: H + Hkv heads rotate
    getattr(lib, f"rotary_store_{_SUFFIX[qkv.dtype]}")(
        qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), _ptr(k_cache), _ptr(v_cache), _ptr(slots), n,
        n_rotated - n_kv, n_kv, dim)
    return qkv, k_cache is not None


def _rotate_torch(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_rotated: int) -> torch.Tensor:
    x = qkv[:, :n_rotated]
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return torch.cat([x * cos + rotated * sin, qkv[:, n_rotated:]], dim=1)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float) -> torch.Tensor | None:
    """Attention of one query per sequence over its paged cache, or None where no kernel applies.

    q: (B, H, D), rows may be strided (a view into the fused qkv); caches (blocks, block_size, Hkv, D).
    """
    batch, n_head, dim = q.shape
    lib = _kernels(k_cache, v_cache, block_tables, context_lens)
    if (lib is None or q.dtype != k_cache.dtype or q.dtype not in _SUFFIX or dim > 256
            or q.stride(2) != 1 or q.stride(1) != dim or block_tables.dtype != torch.int64):
        return None
    out = torch.empty(batch, n_head * dim, dtype=q.dtype)
    getattr(lib, f"decode_attention_{_SUFFIX[q.dtype]}")(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
        block_tables.shape[1], context_lens.data_ptr(), out.data_ptr(), batch, n_head, k_cache.shape[2], dim,
        k_cache.shape[1], scale, torch.get_num_threads())
    return out


def to_float32(x: torch.Tensor) -> torch.Tensor:
    """x.float(), with a bfloat16 tensor converted by the kernel on all threads (torch uses one here)."""
    lib = _kernels(x)
    if lib is None or x.dtype != torch.bfloat16:
        return x.float()
    out = torch.empty(x.shape, dtype=torch.float32)
    lib.bf16_to_f32(x.data_ptr(), out.data_ptr(), x.numel(), torch.get_num_threads())
    return out


# ------------------------------------------------------------------------------ rows of logits
def top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest of each row of x (B, V), descending, like torch.topk.

    Tied values may come in another order than torch.topk's (its order for ties is unspecified too).
    """
    lib = _kernels(x)
    if lib is None or x.dim() != 2 or x.dtype != torch.float32 or not 0 < k <= x.shape[1]:
        return torch.topk(x, k, dim=-1)
    values = torch.empty(x.shape[0], k)
    indices = torch.empty(x.shape[0], k, dtype=torch.int64)
    if lib.top_k_f32(x.data_ptr(), x.shape[0], x.shape[1], k, values.data_ptr(), indices.data_ptr(),
                     torch.get_num_threads()):
        return torch.topk(x, k, dim=-1)  # a row of NaN: torch's order for them
    return values, indices


def logsumexp(x: torch.Tensor) -> torch.Tensor:
    """torch.logsumexp(x, dim=-1) of a (B, V) float32 tensor."""
    lib = _kernels(x)
    if lib is None or x.dim() != 2 or x.dtype != torch.float32 or x.shape[1] == 0:
        return torch.logsumexp(x, dim=-1)
    out = torch.empty(x.shape[0])
    lib.logsumexp_f32(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr(), torch.get_num_threads())
    return out

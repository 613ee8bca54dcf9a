"""The model ops that have a hand-written CPU kernel, each with its PyTorch formula as the fallback.

An op takes the kernel where the loaded tier has it, the tensors are contiguous CPU tensors of the
dtypes and shapes the kernel handles, and no torch.compile trace is running; otherwise it computes
the same result with PyTorch ops. Every op's kernel path is tested against its fallback
(tests/kernels/test_ops.py). Arguments that would make a kernel read or write out of bounds raise
ValueError here, before the C call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nextok.kernels import call, has, tier
from nextok.kernels.packing import GROUP_BYTES, block_format

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
MAX_HEAD_DIM = 256  # csrc/nextok.h


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _usable(name: str, *tensors: torch.Tensor | None) -> bool:
    """Whether kernel `name` exists here and every given tensor suits it (CPU, contiguous), outside a trace."""
    if not has(name) or torch.compiler.is_compiling():
        return False
    return all(t is None or (t.device.type == "cpu" and t.is_contiguous()) for t in tensors)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


# ------------------------------------------------------------------------------ packed products
def packed_linear(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None = None,
                  scale: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ W^T (+ bias) with W (N, K) given packed; int8 weights need `scale` (N,) float32.

    float32 and bfloat16 weights (packed densely, or uint8 blocks laid out for that dtype by
    pack_blocks) take x of their dtype; int8 weights take bfloat16 x.
    """
    k = x.shape[-1]
    name = "linear_int8" if packed.dtype == torch.int8 else f"linear_{_SUFFIX.get(x.dtype, '?')}"
    _require(has(name), f"packed_linear: no {name} kernel here (nextok.kernels.tier() = {tier()})")
    _check_packed(x, packed, n, k)
    _require(bias is None or (bias.shape == (n,) and bias.dtype == x.dtype and bias.is_contiguous()),
             f"packed_linear: bias must be a contiguous ({n},) {x.dtype} tensor")
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
    args = (x.numel() // k, k, n, torch.get_num_threads())
    if packed.dtype == torch.int8:
        _require(scale is not None and scale.shape == (n,) and scale.dtype == torch.float32 and scale.is_contiguous(),
                 f"packed_linear: int8 weights need a contiguous ({n},) float32 scale")
        call(name, x.data_ptr(), packed.data_ptr(), scale.data_ptr(), _ptr(bias), y.data_ptr(), *args)
    else:
        call(name, x.data_ptr(), packed.data_ptr(), block_format(packed), _ptr(bias), y.data_ptr(), *args)
    return y


def _check_packed(x: torch.Tensor, packed: torch.Tensor, n: int, k: int) -> None:
    """The packed matrix holds (n, k) weights in a layout the activations' dtype reads."""
    _require(x.device.type == "cpu" and packed.device.type == "cpu" and packed.is_contiguous(),
             "packed_linear: x and the packed weights must be CPU tensors, the weights contiguous")
    blocks = packed.shape[0]
    _require(blocks % 2 == 0 and blocks * 16 - 32 < n <= blocks * 16,
             f"packed_linear: {blocks} column blocks cannot hold n={n} outputs")
    if packed.dtype == torch.uint8:
        _require(x.dtype in _SUFFIX and packed.dim() == 3 and packed.shape[1] * 32 == k
                 and packed.shape[2] in GROUP_BYTES.values(),
                 f"packed_linear: block-format weights {tuple(packed.shape)} do not fit x (..., {k}) of {x.dtype}")
    elif packed.dtype == torch.float32:
        _require(x.dtype == torch.float32 and packed.shape[1:] == (k, 16),
                 f"packed_linear: float32 weights {tuple(packed.shape)} do not fit x (..., {k}) of {x.dtype}")
    else:
        wanted = torch.bfloat16 if packed.dtype in (torch.bfloat16, torch.int8) else None
        _require(x.dtype == wanted and packed.shape[1:] == (k // 2, 16, 2) and k % 2 == 0,
                 f"packed_linear: {packed.dtype} weights {tuple(packed.shape)} do not fit x (..., {k}) of {x.dtype}")


# ------------------------------------------------------------------------------ element-wise
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    name = f"rms_norm_{_SUFFIX.get(x.dtype, '?')}"
    if not _usable(name, x, weight) or weight.dtype != x.dtype or weight.shape != x.shape[-1:]:
        return torch.rms_norm(x, weight.shape, weight, eps)
    out = torch.empty_like(x)
    call(name, x.data_ptr(), None, weight.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], eps)
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + x, rms_norm(residual + x)); the kernel adds into `residual` in place."""
    name = f"rms_norm_{_SUFFIX.get(x.dtype, '?')}"
    if (not _usable(name, x, residual, weight) or not (weight.dtype == residual.dtype == x.dtype)
            or residual.shape != x.shape or weight.shape != x.shape[-1:]):
        total = residual + x
        return total, torch.rms_norm(total, weight.shape, weight, eps)
    out = torch.empty_like(x)
    call(name, x.data_ptr(), residual.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1],
         x.shape[-1], eps)
    return residual, out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (..., 2I) -> silu(gate) * up (..., I): the SwiGLU activation."""
    inner = gate_up.shape[-1] // 2
    name = f"silu_mul_{_SUFFIX.get(gate_up.dtype, '?')}"
    if not _usable(name, gate_up) or gate_up.shape[-1] % 2:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    out = torch.empty(*gate_up.shape[:-1], inner, dtype=gate_up.dtype)
    call(name, gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // gate_up.shape[-1], inner)
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
    name = f"rotary_store_{_SUFFIX.get(qkv.dtype, '?')}"
    n_kv = heads - n_rotated  # the kernel takes the query and kv head counts: H + Hkv heads rotate
    fits = (dim % 2 == 0 and cos.dtype == sin.dtype == torch.float32 and cos.shape == sin.shape == (n, dim)
            and n_rotated > n_kv > 0)
    if k_cache is not None:
        fits = fits and (k_cache.dtype == v_cache.dtype == qkv.dtype and slots.dtype == torch.int64
                         and slots.shape == (n,) and k_cache.shape[-2:] == (n_kv, dim) == v_cache.shape[-2:]
                         and k_cache.shape == v_cache.shape)
    if not (_usable(name, qkv, cos, sin, k_cache, v_cache, slots) and fits):
        return _rotate_torch(qkv, cos, sin, n_rotated), False
    if k_cache is not None and n:
        capacity = k_cache.numel() // (n_kv * dim)
        _require(0 <= int(slots.min()) and int(slots.max()) < capacity, "rotate: a slot lies outside the KV cache")
    call(name, qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), _ptr(k_cache), _ptr(v_cache), _ptr(slots), n,
         n_rotated - n_kv, n_kv, dim)
    return qkv, k_cache is not None


def _rotate_torch(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_rotated: int) -> torch.Tensor:
    x = qkv[:, :n_rotated]
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return torch.cat([x * cos + rotated * sin, qkv[:, n_rotated:]], dim=1)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    query_start: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor | None:
    """The new tokens' attention over their sequences' paged caches, or None where no kernel applies.

    q: (N, H, D), rows may be strided (a view into the fused qkv); caches (blocks, block_size, Hkv, D);
    sequence b's tokens are q[query_start[b]:query_start[b + 1]], its last positions of context_lens[b].
    Their keys and values must be in the cache already. Returns (N, H * D).
    """
    n_tokens, n_head, dim = q.shape
    name = f"paged_attention_{_SUFFIX.get(q.dtype, '?')}"
    n_kv, batch = k_cache.shape[2], context_lens.shape[0]
    if (not _usable(name, k_cache, v_cache, block_tables, query_start, context_lens) or q.device.type != "cpu"
            or q.dtype != k_cache.dtype or v_cache.dtype != q.dtype or dim > MAX_HEAD_DIM or q.stride(2) != 1
            or q.stride(1) != dim or block_tables.dtype != torch.int64 or context_lens.dtype != torch.int64
            or query_start.dtype != torch.int64 or k_cache.shape[-1] != dim or k_cache.shape != v_cache.shape
            or n_head % n_kv or block_tables.shape[0] != batch or query_start.shape != (batch + 1,)):
        return None
    check_attention_inputs(block_tables, query_start, context_lens, k_cache, n_tokens)
    out = torch.empty(n_tokens, n_head * dim, dtype=q.dtype)
    call(name, q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
         block_tables.shape[1], query_start.data_ptr(), context_lens.data_ptr(), out.data_ptr(), batch, n_head, n_kv,
         dim, k_cache.shape[1], scale, torch.get_num_threads())
    return out


def check_attention_inputs(block_tables: torch.Tensor, query_start: torch.Tensor, context_lens: torch.Tensor,
                           k_cache: torch.Tensor, n_tokens: int) -> None:
    """Queries, contexts and block tables describe reads inside the cache (else ValueError, not a bad read)."""
    _require(query_start.numel() >= 1 and int(query_start[0]) == 0 and int(query_start[-1]) == n_tokens,
             "attention: query_start must run from 0 to the number of tokens")
    if context_lens.numel() == 0:
        return
    query_lens = query_start[1:] - query_start[:-1]
    _require(bool((query_lens >= 1).all()) and bool((context_lens >= query_lens).all()),
             "attention: every sequence needs 1 to context_len new tokens")
    _require(int(context_lens.max()) <= block_tables.shape[1] * k_cache.shape[1],
             "attention: a context is longer than its block table")
    _require(0 <= int(block_tables.min()) and int(block_tables.max()) < k_cache.shape[0],
             "attention: a block table names a block outside the KV cache")


def to_float32(x: torch.Tensor) -> torch.Tensor:
    """x.float(), with a bfloat16 tensor converted by the kernel on all threads (torch uses one here)."""
    if not _usable("bf16_to_f32", x) or x.dtype != torch.bfloat16:
        return x.float()
    out = torch.empty(x.shape, dtype=torch.float32)
    call("bf16_to_f32", x.data_ptr(), out.data_ptr(), x.numel(), torch.get_num_threads())
    return out


# ------------------------------------------------------------------------------ rows of logits
def top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest of each row of x (B, V), descending, like torch.topk.

    Tied values may come in another order than torch.topk's (its order for ties is unspecified too).
    """
    if not _usable("top_k_f32", x) or x.dim() != 2 or x.dtype != torch.float32 or not 0 < k <= x.shape[1]:
        return torch.topk(x, k, dim=-1)
    values = torch.empty(x.shape[0], k)
    indices = torch.empty(x.shape[0], k, dtype=torch.int64)
    if call("top_k_f32", x.data_ptr(), x.shape[0], x.shape[1], k, values.data_ptr(), indices.data_ptr(),
            torch.get_num_threads()):
        return torch.topk(x, k, dim=-1)  # a row of NaN: torch's order for them
    return values, indices


def logsumexp(x: torch.Tensor) -> torch.Tensor:
    """torch.logsumexp(x, dim=-1) of a (B, V) float32 tensor."""
    if not _usable("logsumexp_f32", x) or x.dim() != 2 or x.dtype != torch.float32 or x.shape[1] == 0:
        return torch.logsumexp(x, dim=-1)
    out = torch.empty(x.shape[0])
    call("logsumexp_f32", x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr(), torch.get_num_threads())
    return out

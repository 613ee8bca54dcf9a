"""Each hand-written kernel against the PyTorch formula it replaces."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from nextok.kernels import has, library, ops, packing
from tests.kernels.test_packing import dense as dense_values
from tests.kernels.test_packing import random_groups

pytestmark = pytest.mark.skipif(library() is None, reason="nextok's CPU kernels need AVX-512 BF16 and a C compiler")

DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]


def close(actual, expected, tol):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 13, 16, 40])
@pytest.mark.parametrize("k,n", [(64, 96), (576, 962), (50, 7), (1536, 576)])
def test_packed_linear_matches_torch(dtype, tol, rows, k, n):
    torch.manual_seed(rows * 1000 + k + n)
    x, w, b = torch.randn(rows, k, dtype=dtype), torch.randn(n, k, dtype=dtype) / k**0.5, torch.randn(n, dtype=dtype)
    packed = packing.pack_weight(w)
    assert torch.equal(packing.unpack_weight(packed, n), w)
    close(ops.packed_linear(x, packed, n), F.linear(x.float(), w.float()).to(dtype), tol)
    close(ops.packed_linear(x, packed, n, b), F.linear(x.float(), w.float(), b.float()).to(dtype), tol)


@pytest.mark.parametrize("rows", [1, 4, 7, 16, 21])
@pytest.mark.parametrize("k,n", [(64, 96), (576, 962), (1536, 577)])
def test_int8_packed_linear_matches_the_dequantised_product(rows, k, n):
    torch.manual_seed(rows + k + n)
    x = torch.randn(rows, k, dtype=torch.bfloat16)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale = torch.rand(n) / 100
    b = torch.randn(n, dtype=torch.bfloat16)
    expected = (x.float() @ (w.float() * scale[:, None]).t() + b.float()).bfloat16()
    close(ops.packed_linear(x, packing.pack_weight(w), n, b, scale), expected, 2e-2)


def _gguf_values(n: int, k: int, qtype: Q, seed: int) -> torch.Tensor:
    """A float32 matrix as a GGUF checkpoint of `qtype` holds it after dequantization."""
    w = np.random.default_rng(seed).normal(0, 0.05, (n, k)).astype(np.float32)
    return torch.from_numpy(gguf_dequantize(gguf_quantize(w, qtype), qtype).reshape(n, k))


@pytest.mark.parametrize("qtype,group_bytes", [(Q.Q4_1, packing.Q4_GROUP_BYTES), (Q.Q8_0, packing.Q8_GROUP_BYTES)],
                         ids=["q4_1", "q8_0"])
@pytest.mark.parametrize("k,n", [(64, 96), (576, 962), (1536, 577)])
def test_block_format_products_equal_the_dense_ones_bit_for_bit(qtype, group_bytes, k, n):
    w = _gguf_values(n, k, qtype, seed=k + n)
    packed = packing.pack_blocks(w)
    assert packed is not None and packed.dtype == torch.uint8 and packed.shape == ((n + 31) // 32 * 2, k // 32, group_bytes)
    assert torch.equal(packing.unpack_blocks(packed, n).view(torch.int32), w.view(torch.int32))
    assert torch.equal(packing.unpack_weight(packed, n).view(torch.int32), w.view(torch.int32))  # what PackedLinear.weight calls
    dense = packing.pack_weight(w)
    b = torch.randn(n)
    for rows in (1, 2, 3, 4, 5, 8, 9, 17):  # the micro-kernels in registers, then widened chunks (more than 4 rows)
        x = torch.randn(rows, k)
        assert torch.equal(ops.packed_linear(x, packed, n), ops.packed_linear(x, dense, n)), rows
        assert torch.equal(ops.packed_linear(x, packed, n, b), ops.packed_linear(x, dense, n, b)), rows
        close(ops.packed_linear(x, packed, n, b), F.linear(x, w, b), 1e-5)


@pytest.mark.parametrize("qtype,group_bytes", [(Q.Q4_1, packing.Q4_GROUP_BYTES), (Q.Q8_0, packing.Q8_GROUP_BYTES)],
                         ids=["q4_1", "q8_0"])
@pytest.mark.parametrize("k,n", [(64, 96), (576, 962), (1536, 577)])
def test_bfloat16_block_products_equal_the_cast_dense_ones_bit_for_bit(qtype, group_bytes, k, n):
    """Blocks laid out for bfloat16 widen to the float32 values rounded to bfloat16, as casting the matrix rounds."""
    w = _gguf_values(n, k, qtype, seed=k + n)
    packed = packing.pack_blocks(w, torch.bfloat16)
    assert packed is not None and packed.shape == ((n + 31) // 32 * 2, k // 32, group_bytes)
    assert not torch.equal(packed, packing.pack_blocks(w))  # the q bytes are ordered for the bfloat16 pair layout
    cast = w.bfloat16()
    assert torch.equal(packing.unpack_weight(packed, n, torch.bfloat16).view(torch.int16), cast.view(torch.int16))
    dense = packing.pack_weight(cast)
    b = torch.randn(n, dtype=torch.bfloat16)
    for rows in (1, 3, 4, 5, 16, 17, 40):  # the AVX-512 micro-kernel below 5 rows, the tile unit (if any) from 5
        x = torch.randn(rows, k, dtype=torch.bfloat16)
        assert torch.equal(ops.packed_linear(x, packed, n), ops.packed_linear(x, dense, n)), rows
        assert torch.equal(ops.packed_linear(x, packed, n, b), ops.packed_linear(x, dense, n, b)), rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt,size", [(packing.FORMAT_Q8X, 16), (packing.FORMAT_Q4, 32), (packing.FORMAT_Q8, 32)],
                         ids=["q8x", "q4", "q8"])
@pytest.mark.parametrize("k,n", [(64, 96), (1536, 577)])
def test_group_products_equal_the_dense_ones_bit_for_bit(dtype, fmt, size, k, n):
    """Every block format, from groups of any scale: products over the blocks equal the products over
    the matrix they hold (bfloat16: cast), for every number of rows and tile shape."""
    if dtype == torch.bfloat16 and not has("linear_bf16"):
        pytest.skip("the bfloat16 kernels need AVX-512 BF16")
    groups = random_groups(n, k, fmt, seed=k + n, size=size)
    for g in groups.scale, groups.minimum:  # products of moderate size: no inf in the sums
        if g is not None:
            g.copy_(g.clamp(-1e-2, 1e-2).half())  # still float16 values: q * scale is exact
    packed = packing.pack_groups(groups, dtype)
    dense = packing.pack_weight(dense_values(groups).to(dtype))
    b = torch.randn(n, dtype=dtype)
    for rows in (1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17, 33, 64):
        x = torch.randn(rows, k, dtype=dtype)
        assert torch.equal(ops.packed_linear(x, packed, n, b), ops.packed_linear(x, dense, n, b)), rows


def test_block_formats_are_for_float32_and_bfloat16_products():
    with pytest.raises(ValueError, match="float16"):
        packing.pack_blocks(_gguf_values(32, 64, Q.Q8_0, 0), torch.float16)


def test_matrices_that_no_block_format_holds_stay_dense():
    assert packing.pack_blocks(torch.randn(64, 64)) is None  # any float32 values
    assert packing.pack_blocks(_gguf_values(64, 64, Q.Q8_0, 0).bfloat16()) is None  # float32 only
    assert packing.pack_blocks(_gguf_values(8, 64, Q.Q8_0, 0)[:, :40].contiguous()) is None  # K not a multiple of 32
    w = _gguf_values(64, 64, Q.Q4_1, 0)
    w[5, 7] = torch.nextafter(w[5, 7], torch.tensor(1.0))  # one weight one float32 step away
    assert packing.pack_blocks(w) is None
    zeros = _gguf_values(64, 64, Q.Q8_0, 0)
    zeros[3] = -0.0  # a group of negative zeros: the kernel's integers would make them +0.0
    assert packing.pack_blocks(zeros) is None
    w[5, 7] = float("nan")
    assert packing.pack_blocks(w) is None


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("shape", [(1, 576), (5, 64), (3, 2, 50)])
def test_rms_norm_and_residual_add(dtype, tol, shape):
    torch.manual_seed(0)
    x, r, w = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype), torch.rand(shape[-1], dtype=dtype)
    close(ops.rms_norm(x, w, 1e-5), torch.rms_norm(x.float(), w.shape, w.float(), 1e-5).to(dtype), tol)
    expected_sum = (r.float() + x.float()).to(dtype)
    total, normed = ops.add_rms_norm(x, r.clone(), w, 1e-5)
    close(total, expected_sum, tol)
    close(normed, torch.rms_norm(expected_sum.float(), w.shape, w.float(), 1e-5).to(dtype), tol)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_silu_mul(dtype, tol):
    torch.manual_seed(0)
    gu = torch.randn(3, 2 * 1537, dtype=dtype) * 6
    gu[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -88.5])
    gate, up = gu.float().chunk(2, dim=-1)
    close(ops.silu_mul(gu), (F.silu(gate) * up).to(dtype), tol)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_rotate_matches_rotate_half(dtype, tol):
    torch.manual_seed(0)
    n, heads, rotated, dim = 4, 9 + 6, 12, 64
    qkv = torch.randn(n, heads, dim, dtype=dtype)
    angles = torch.rand(n, dim // 2) * 10
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    expected = ops._rotate_torch(qkv.float(), cos, sin, rotated).to(dtype)
    rotated_qkv, stored = ops.rotate(qkv.clone(), cos, sin, rotated)
    close(rotated_qkv, expected, tol)
    assert not stored
    k_cache, v_cache = torch.zeros(8, 4, 3, dim, dtype=dtype), torch.zeros(8, 4, 3, dim, dtype=dtype)
    slots = torch.tensor([5, 0, 31, 17])
    rotated_qkv, stored = ops.rotate(qkv.clone(), cos, sin, rotated, (k_cache, v_cache), slots)
    assert stored
    close(rotated_qkv, expected, tol)
    assert torch.equal(k_cache.view(-1, 3, dim)[slots], rotated_qkv[:, 9:12])
    assert torch.equal(v_cache.view(-1, 3, dim)[slots], rotated_qkv[:, 12:])
    assert k_cache.view(-1, 3, dim)[1:5].abs().sum() == 0  # nothing else written


def _paged(dtype, n_kv, dim, seed):
    torch.manual_seed(seed)
    blocks, block_size = 64, 4
    k_cache = torch.randn(blocks, block_size, n_kv, dim, dtype=dtype)
    v_cache = torch.randn(blocks, block_size, n_kv, dim, dtype=dtype)
    tables = torch.randperm(blocks)[:60].view(6, 10)
    return k_cache, v_cache, tables


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("n_head,n_kv,dim", [(9, 3, 64), (4, 4, 16), (6, 1, 40), (8, 2, 128), (4, 1, 256)])
@pytest.mark.parametrize("query_lens", [[1, 1, 1], [1, 1, 1, 1, 1, 1], [3, 1, 5], [1, 16, 1, 7, 2, 1]],
                         ids=["decode3", "decode6", "chunks", "mixed"])  # jobs per (token, kv head), then per token
def test_paged_attention_reads_the_paged_cache(dtype, tol, n_head, n_kv, dim, query_lens):
    k_cache, v_cache, tables = _paged(dtype, n_kv, dim, n_head + dim)
    batch, block_size = len(query_lens), k_cache.shape[1]
    lens = torch.tensor([10, 16, 5, 40, 23, 33])[:batch]  # keys in chunks of 16: whole, partial, one
    starts = torch.tensor([0, *query_lens]).cumsum(0)
    qkv = torch.randn(int(starts[-1]), n_head + 2 * n_kv, dim, dtype=dtype)
    q = qkv[:, :n_head]  # strided rows, as the model passes it
    out = ops.paged_attention(q, k_cache, v_cache, tables[:batch], starts, lens, 0.3)
    assert out is not None
    for b in range(batch):
        length, n = int(lens[b]), query_lens[b]
        slots = [int(tables[b, p // block_size]) * block_size + p % block_size for p in range(length)]
        keys = k_cache.reshape(-1, n_kv, dim)[slots].float().transpose(0, 1)  # (Hkv, L, D)
        values = v_cache.reshape(-1, n_kv, dim)[slots].float().transpose(0, 1)
        mask = torch.arange(length)[None, :] <= torch.arange(length - n, length)[:, None]  # (n, L): causal
        rows = q[starts[b]:starts[b + 1]].float().transpose(0, 1)  # (H, n, D)
        expected = F.scaled_dot_product_attention(rows, keys, values, attn_mask=mask, scale=0.3, enable_gqa=True)
        close(out[starts[b]:starts[b + 1]], expected.transpose(0, 1).reshape(n, -1).to(dtype), tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_token_attends_the_same_in_any_chunk_or_batch(dtype):
    """Each query is computed alone: as part of a 12-token chunk, one at a time as decodes, or beside
    other sequences, its output is the same bit for bit."""
    k_cache, v_cache, tables = _paged(dtype, 3, 64, 7)
    q = torch.randn(12, 9, 64, dtype=dtype)
    chunk = ops.paged_attention(q, k_cache, v_cache, tables[:1], torch.tensor([0, 12]), torch.tensor([30]), 0.125)
    one_by_one = torch.cat([ops.paged_attention(q[i:i + 1], k_cache, v_cache, tables[:1], torch.tensor([0, 1]),
                                                torch.tensor([19 + i]), 0.125) for i in range(12)])
    assert torch.equal(chunk, one_by_one)
    others = torch.randn(5, 9, 64, dtype=dtype)
    mixed = ops.paged_attention(torch.cat([q, others]), k_cache, v_cache, tables[:3], torch.tensor([0, 12, 14, 17]),
                                torch.tensor([30, 9, 40]), 0.125)
    assert torch.equal(mixed[:12], chunk)


def test_paged_attention_refuses_reads_outside_the_cache():
    k_cache, v_cache, tables = _paged(torch.float32, 3, 64, 1)
    q = torch.randn(2, 9, 64)
    with pytest.raises(ValueError, match="longer than its block table"):
        ops.paged_attention(q, k_cache, v_cache, tables[:1], torch.tensor([0, 2]), torch.tensor([41]), 0.1)
    bad = tables[:1].clone()
    bad[0, 0] = 64
    with pytest.raises(ValueError, match="outside the KV cache"):
        ops.paged_attention(q, k_cache, v_cache, bad, torch.tensor([0, 2]), torch.tensor([4]), 0.1)
    with pytest.raises(ValueError, match="new tokens"):
        ops.paged_attention(q, k_cache, v_cache, tables[:1], torch.tensor([0, 2]), torch.tensor([1]), 0.1)


@pytest.mark.parametrize("rows,vocab,k", [(1, 49152, 66), (16, 49152, 50), (3, 2000, 1), (5, 100, 100), (4, 37, 20)])
def test_top_k_and_logsumexp_match_torch(rows, vocab, k):
    torch.manual_seed(rows + vocab + k)
    x = torch.randn(rows, vocab) * 4
    x[0, : vocab // 3] = float("-inf")  # masked tokens (logit_bias, penalties)
    x[-1, 5:9] = x[-1].max() + 1  # a tie at the top
    values, indices = ops.top_k(x, k)
    expected = torch.topk(x, k, dim=-1).values
    assert torch.equal(values, expected)
    assert torch.equal(x.gather(1, indices), values)  # every index points at its value
    assert all(len(set(r)) == k for r in indices.tolist())  # and no column twice
    torch.testing.assert_close(ops.logsumexp(x), torch.logsumexp(x, dim=-1), atol=1e-5, rtol=1e-6)


def test_top_k_and_logsumexp_edge_rows():
    x = torch.full((2, 300), float("-inf"))
    x[1, 7] = float("inf")
    assert torch.equal(ops.logsumexp(x), torch.logsumexp(x, dim=-1))
    nan = torch.randn(2, 300)
    nan[1] = float("nan")  # fewer than k candidates: torch.topk's answer, NaN first
    values, indices = ops.top_k(nan, 10)
    expected = torch.topk(nan, 10, dim=-1)
    assert torch.equal(values[0], expected.values[0]) and values[1].isnan().all()


@pytest.mark.parametrize("shape", [(16, 49152), (3, 37), (1, 1), (0, 5)])
def test_to_float32_equals_torch(shape):
    x = (torch.randn(shape) * 100).bfloat16()
    if x.numel():
        x.view(-1)[0] = float("-inf")
    out = ops.to_float32(x)
    assert out.dtype == torch.float32 and torch.equal(out, x.float())
    assert torch.equal(ops.to_float32(x.float()), x.float())  # float32 stays as is


@pytest.mark.parametrize("kind", ["float32", "float32-q4", "float32-q8", "float32-q8x", "bfloat16", "bfloat16-q4",
                                  "bfloat16-q8x", "int8"])
def test_every_row_is_computed_as_if_alone(kind):
    """Batch invariance: row i of an M-row product equals the 1-row product of that row, bit for bit, for
    every M (the tiling changes with M; each row's additions do not)."""
    if kind.startswith("bfloat16") or kind == "int8":
        if not has("linear_bf16"):
            pytest.skip("the bfloat16 and int8 kernels need AVX-512 BF16")
    k, n = 576, 200
    torch.manual_seed(5)
    w = torch.randn(n, k) * 0.05
    if kind.endswith(("q4", "q8")):
        w = _gguf_values(n, k, Q.Q4_1 if kind.endswith("q4") else Q.Q8_0, seed=3)
    dtype = torch.float32 if kind.startswith("float32") else torch.bfloat16
    scale = None
    if kind == "int8":
        packed, scale = packing.pack_weight(torch.randint(-127, 128, (n, k), dtype=torch.int8)), torch.rand(n) / 100
    elif kind.endswith("q8x"):
        packed = packing.pack_groups(random_groups(n, k, packing.FORMAT_Q8X, seed=3, size=16), dtype)
    elif "-q" in kind:
        packed = packing.pack_blocks(w, dtype)
        assert packed is not None and packed.dtype == torch.uint8
    else:
        packed = packing.pack_weight(w.to(dtype))
    bias = torch.randn(n, dtype=dtype)
    x = torch.randn(70, k, dtype=dtype)
    alone = torch.cat([ops.packed_linear(x[i:i + 1], packed, n, bias, scale) for i in range(70)])
    for rows in (2, 3, 4, 5, 6, 7, 8, 9, 13, 16, 17, 33, 70):
        together = ops.packed_linear(x[:rows], packed, n, bias, scale)
        assert torch.equal(together, alone[:rows]), rows

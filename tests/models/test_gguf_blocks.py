"""nextok/models/gguf_blocks.py: GGUF tensors read from their quantized blocks into the kernels' block
formats, against gguf's own dequantizer; and GGUF Llama models that keep their blocks.

gguf-py cannot quantize the K-quants, so the blocks are random bits, with float16 scales chosen:
of every magnitude float16 has (zeros, subnormals, the largest, negatives), or of one size for models.
Values are compared with torch.equal: gguf's -0.0 (d * 0 with d < 0) is the kernels' +0.0, which no
product can tell apart.
"""

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize

from nextok.kernels import has, library, ops, packing
from nextok.models import linear
from nextok.models.gguf_blocks import BLOCK_TYPES, QuantizedWeight, decode
from nextok.models.linear import PackedLinear, QuantizedEmbedding, QuantizedLinear
from nextok.models.loader import load_checkpoint
from nextok.models.registry import build_model
from tests.models.checkpoints import (gpt2_to_gguf, llama_to_gguf, tiny_gpt2, tiny_llama, tiny_qwen2,
                                     write_gguf)

pytestmark = pytest.mark.skipif(library() is None, reason="nextok's CPU kernels need AVX-512 and a C compiler")

TYPES = list(BLOCK_TYPES)
# byte offsets of each type's float16 scale (and minimum) in a block; its largest |q * sub-block scale|
_SCALES = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q8_0: (0,), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2),
           Q.Q6_K: (208,)}
_REACH = {Q.Q4_0: 8, Q.Q4_1: 15, Q.Q8_0: 127, Q.Q5_0: 16, Q.Q5_1: 31, Q.Q4_K: 15 * 63, Q.Q5_K: 31 * 63,
          Q.Q6_K: 32 * 127}


def random_blocks(qtype: Q, rows: int, k: int, seed: int, amplitude: float | None = None) -> np.ndarray:
    """Raw blocks (rows, bytes a row) of a (rows, k) matrix: random bits and chosen float16 scales, of
    weights about `amplitude` in size where given, else of every magnitude float16 has."""
    rng = np.random.default_rng(seed)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, k // block * type_size), dtype=np.uint8)
    blocks = raw.reshape(-1, type_size)
    for at in _SCALES[qtype]:
        if amplitude is None:
            d = np.clip(rng.normal(0, 1, len(blocks)) * 10.0 ** rng.integers(-8, 5, len(blocks)), -65504, 65504)
            d[::7], d[3::11], d[5::13] = 0.0, 65504.0, -6e-8  # zero, the largest, a subnormal
        else:
            d = rng.uniform(-1, 1, len(blocks)) * amplitude / _REACH[qtype]
        blocks[:, at:at + 2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw


def reference(raw: np.ndarray, qtype: Q) -> torch.Tensor:
    return torch.from_numpy(gguf_dequantize(raw, qtype).reshape(raw.shape[0], -1).copy())


def _need(dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and not has("linear_bf16"):
        pytest.skip("the bfloat16 kernels need AVX-512 BF16")


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_hold_gguf_values(qtype, dtype):
    raw = random_blocks(qtype, 40, 512, seed=int(qtype))
    ref = reference(raw, qtype)
    groups = decode(raw, qtype)
    assert groups.format == BLOCK_TYPES[qtype] and groups.q.dtype == torch.int8 and groups.q.shape == (40, 512)
    packed = packing.pack_groups(groups, dtype)
    assert packed.shape == (4, 16, packing.GROUP_BYTES[groups.format])
    assert torch.equal(packing.unpack_blocks(packed, 40, dtype), ref.to(dtype))
    assert torch.equal(QuantizedWeight(raw, qtype, (40, 512)).dequantize(), ref)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_products_equal_the_dense_ones_bit_for_bit(qtype, dtype):
    """Products of 1..64 rows over the packed blocks equal the dense kernel's over gguf's dequantized matrix
    (bfloat16: cast), at every tile shape of both."""
    _need(dtype)
    n, k = 72, 512
    raw = random_blocks(qtype, n, k, seed=int(qtype) + 1)
    layer = PackedLinear(QuantizedLinear([QuantizedWeight(raw, qtype, (n, k))], torch.randn(n)), dtype)
    assert layer.packed.dtype == torch.uint8 and packing.block_format(layer.packed) == BLOCK_TYPES[qtype]
    dense = packing.pack_weight(reference(raw, qtype).to(dtype))
    bias = layer.bias
    for rows in (1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17, 33, 64):
        x = torch.randn(rows, k).to(dtype)
        assert torch.equal(layer(x), ops.packed_linear(x, dense, n, bias)), rows


def test_scales_that_are_not_finite_stay_dense():
    raw = random_blocks(Q.Q4_K, 32, 256, seed=3, amplitude=1.0)
    raw[5, 0:2] = np.array([np.inf], np.float16).view(np.uint8)
    assert decode(raw, Q.Q4_K) is None
    with np.errstate(invalid="ignore"):  # gguf's inf * 0
        layer = PackedLinear(QuantizedLinear([QuantizedWeight(raw, Q.Q4_K, (32, 256))], None))
        expected = reference(raw, Q.Q4_K).numpy()
    assert layer.packed.dtype == torch.float32  # dense, holding gguf's inf and NaN
    np.testing.assert_array_equal(layer.weight.numpy(), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_parts_keep_their_blocks(dtype, monkeypatch):
    """q/k/v and gate/up concatenate their rows' blocks, in the format every part fits, packed in windows
    of rows that cross the parts' boundaries."""
    _need(dtype)
    monkeypatch.setattr(linear, "_WINDOW_WEIGHTS", 32 * 256)  # windows of 32 rows
    k = 256
    for types, fmt in (([Q.Q4_K, Q.Q6_K, Q.Q8_0], packing.FORMAT_Q8X), ([Q.Q8_0, Q.Q5_0], packing.FORMAT_Q8),
                       ([Q.Q4_K, Q.Q4_0, Q.Q4_1], packing.FORMAT_Q4), ([Q.Q4_K, Q.Q6_K, Q.Q5_K], packing.FORMAT_Q8K),
                       ([Q.Q4_K, Q.Q4_K], packing.FORMAT_Q4K)):
        parts = [random_blocks(q, rows, k, seed=rows, amplitude=1.0) for q, rows in zip(types, (48, 16, 40))]
        layers = [QuantizedLinear([QuantizedWeight(raw, q, (len(raw), k))], None) for raw, q in zip(parts, types)]
        fused = PackedLinear(QuantizedLinear.fuse(*layers), dtype)
        w = torch.cat([reference(raw, q) for raw, q in zip(parts, types)])
        assert packing.block_format(fused.packed) == fmt and fused.out_features == len(w)
        assert torch.equal(fused.weight, w.to(dtype))
        x = torch.randn(3, k).to(dtype)
        assert torch.equal(fused(x), ops.packed_linear(x, packing.pack_weight(w.to(dtype)), len(w)))


# ------------------------------------------------------------------------------------------ models

LAYER_TYPES = [  # Q4_K_M-like (v and down in Q6_K), then the older types
    {"attn_q": Q.Q4_K, "attn_k": Q.Q4_K, "attn_v": Q.Q6_K, "attn_output": Q.Q5_K, "ffn_gate": Q.Q4_K,
     "ffn_up": Q.Q4_K, "ffn_down": Q.Q6_K},
    {"attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q8_0, "attn_output": Q.Q5_0, "ffn_gate": Q.Q5_1,
     "ffn_up": Q.Q5_1, "ffn_down": Q.Q8_0},
]


def write_quantized_llama(path: Path, tie: bool = False) -> Path:
    """A 2-layer Llama GGUF (hidden 256, 4 heads of 64, 2 KV heads, inner 512, vocab 256) in random blocks."""
    hidden, inner, vocab, rng = 256, 512, 256, np.random.default_rng(0)
    shapes = {"attn_q": (256, hidden), "attn_k": (128, hidden), "attn_v": (128, hidden),
              "attn_output": (hidden, 256), "ffn_gate": (inner, hidden), "ffn_up": (inner, hidden),
              "ffn_down": (hidden, inner)}
    tensors = {"token_embd.weight": (random_blocks(Q.Q6_K, vocab, hidden, 1, amplitude=1.0), Q.Q6_K),
               "output_norm.weight": (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)}
    if not tie:
        tensors["output.weight"] = (random_blocks(Q.Q6_K, vocab, hidden, 2, amplitude=0.2), Q.Q6_K)
    for i, types in enumerate(LAYER_TYPES):
        for name in ("attn_norm", "ffn_norm"):
            tensors[f"blk.{i}.{name}.weight"] = (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
        for j, (name, qtype) in enumerate(types.items()):
            rows, k = shapes[name]
            tensors[f"blk.{i}.{name}.weight"] = (random_blocks(qtype, rows, k, 10 * i + j, amplitude=0.15), qtype)
    meta = {"llama.block_count": 2, "llama.context_length": 256, "llama.embedding_length": hidden,
            "llama.feed_forward_length": inner, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
            "llama.rope.freq_base": 10000.0, "llama.attention.layer_norm_rms_epsilon": 1e-5,
            "llama.vocab_size": vocab, "llama.rope.dimension_count": 64, "general.name": "tiny"}
    return write_gguf(path, "llama", meta, tensors)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_blocks_load_as_the_dense_conversion(tie, tmp_path):
    """Straight from the file, no cache: the same weights (q/k rows in the HF order) as the dense conversion."""
    path = write_quantized_llama(tmp_path / "tiny.gguf", tie)
    kept = load_checkpoint(path, cache_dir=tmp_path / "unused", blocks=True)
    dense = load_checkpoint(path, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "unused").exists()
    assert set(kept.state_dict) == set(dense.state_dict) and kept.config == dense.config
    for key, value in kept.state_dict.items():
        if key.endswith("norm.weight"):
            assert isinstance(value, torch.Tensor) and torch.equal(value, dense.state_dict[key]), key
        else:
            assert isinstance(value, QuantizedWeight), key
            assert torch.equal(value.dequantize(), dense.state_dict[key]), key


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_a_k_quant_llama_decodes_as_the_dense_model(dtype, tie, tmp_path, monkeypatch):
    """The model built from the blocks gives the dense model's logits bit for bit, and its tokens."""
    _need(getattr(torch, dtype))
    from nextok import LLM, SamplingParams
    from nextok import llm as llm_module

    monkeypatch.setenv("NEXTOK_CACHE", str(tmp_path / "cache"))
    path = write_quantized_llama(tmp_path / "tiny.gguf", tie)
    kept = LLM(str(path), dtype=dtype, kv_cache_memory=16 << 20)
    formats = {name: packing.block_format(m.packed) for name, m in kept.model.named_modules()
               if isinstance(m, PackedLinear)}
    assert formats["model.layers.0.self_attn.qkv_proj"] == packing.FORMAT_Q8K  # Q4_K, Q4_K and Q6_K
    assert formats["model.layers.0.mlp.gate_up_proj"] == packing.FORMAT_Q4K  # Q4_K
    assert formats["model.layers.1.self_attn.o_proj"] == packing.FORMAT_Q8  # Q5_0
    assert formats["lm_head"] == packing.FORMAT_Q8K  # Q6_K (tied: the embedding's blocks)
    assert isinstance(kept.model.model.embed_tokens, QuantizedEmbedding)  # rows dequantized as looked up
    monkeypatch.setattr(llm_module, "keeps_blocks", lambda *args: False)
    dense = LLM(str(path), dtype=dtype, kv_cache_memory=16 << 20)
    assert isinstance(dense.model.model.layers[0].mlp.down_proj, PackedLinear)
    ids, positions = torch.tensor([5, 17, 200, 3, 99, 42]), torch.arange(6)
    logits = [m.compute_logits(m(ids, positions)) for m in (kept.model, dense.model)]
    assert torch.equal(*logits)
    prompts = [[1, 2, 3], [200, 100, 50, 25, 12]]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    ours, theirs = (m.generate(prompt_token_ids=prompts, params=params) for m in (kept, dense))
    assert [r.outputs[0].token_ids for r in ours] == [r.outputs[0].token_ids for r in theirs]


def test_blocks_need_the_kernels_for_their_dtype(tmp_path):
    """float16 (or a GPU) dequantizes the blocks: the same weights, dense."""
    path = write_quantized_llama(tmp_path / "tiny.gguf")
    checkpoint = load_checkpoint(path, blocks=True)
    model = build_model(checkpoint.config, checkpoint.state_dict, torch.float16)
    down = model.model.layers[0].mlp.down_proj
    assert not linear.keeps_blocks(torch.float16) and down.weight.dtype == torch.float16
    assert torch.equal(down.weight, checkpoint.state_dict["model.layers.0.mlp.down_proj.weight"].dequantize().half())


@pytest.mark.parametrize("make,to_gguf,qtype", [
    (tiny_qwen2, llama_to_gguf, Q.Q4_0), (tiny_gpt2, gpt2_to_gguf, Q.Q8_0), (tiny_llama, llama_to_gguf, Q.Q5_1),
], ids=["qwen2-tied-bias-q4_0", "gpt2-q8_0", "llama-q5_1"])
def test_other_models_build_from_blocks_as_from_the_dense_conversion(make, to_gguf, qtype, tmp_path):
    """q/k/v biases fuse with their blocks; GPT-2's transposed matrices stay dense, its head in blocks."""
    path = tmp_path / "tiny.gguf"
    to_gguf(make(), path, qtype)
    models = [build_model(c.config, c.state_dict) for c in (load_checkpoint(path, blocks=True),
                                                           load_checkpoint(path, cache_dir=tmp_path / "cache"))]
    assert isinstance(models[0].lm_head, PackedLinear) and models[0].lm_head.packed.dtype == torch.uint8
    embedding = models[0].get_submodule("transformer.wte" if make is tiny_gpt2 else "model.embed_tokens")
    assert isinstance(embedding, QuantizedEmbedding)
    with pytest.raises(IndexError):
        embedding(torch.tensor([0, 128]))
    ids, positions = torch.tensor([5, 17, 100, 3]), torch.arange(4)
    logits = [m.compute_logits(m(ids, positions)) for m in models]
    assert torch.equal(*logits)

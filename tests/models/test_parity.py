"""Logits of nextok's own models equal transformers' for the same weights (float32, CPU)."""

from __future__ import annotations

import pytest
import torch

from nextok.models.attention import AttentionMetadata

from .helpers import gpt2_pair, llama_pair

LLAMA_SHAPES = {
    "gqa-untied": dict(),
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "mqa-odd-heads": dict(hidden_size=60, num_attention_heads=5, num_key_value_heads=1, head_dim=12),
    "qkv-bias": dict(attention_bias=True),
    "llama3-rope": dict(rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                                 high_freq_factor=4.0, original_max_position_embeddings=32)),
    "qwen2": dict(qwen2=True, num_key_value_heads=2),
}
GPT2_SHAPES = {
    "small": dict(),
    "odd-heads": dict(n_embd=60, n_head=5),
    "three-layers": dict(n_layer=3, n_head=2),
}


def _pairs():
    for name, cfg in LLAMA_SHAPES.items():
        yield pytest.param(lambda cfg=cfg: llama_pair(**cfg), id=f"llama-{name}")
    for name, cfg in GPT2_SHAPES.items():
        yield pytest.param(lambda cfg=cfg: gpt2_pair(**cfg), id=f"gpt2-{name}")


@pytest.fixture(params=list(_pairs()))
def pair(request):
    return request.param()


def full_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.compute_logits(model(ids, torch.arange(len(ids))))


def cached_logits(model, ids: torch.Tensor, prefill: int, block_size: int = 4) -> torch.Tensor:
    """Prefill the first tokens into a paged cache, then decode the rest one token at a time."""
    layers, n_kv, head_dim = model.kv_shape
    num_blocks = 64
    caches = [(torch.zeros(num_blocks, block_size, n_kv, head_dim), torch.zeros(num_blocks, block_size, n_kv, head_dim))
              for _ in range(layers)]
    table = list(range(num_blocks - 1, 0, -3))  # scattered, out-of-order blocks
    rows = []
    with torch.inference_mode():
        meta = AttentionMetadata.paged([table], [prefill], [prefill], block_size)
        rows.append(model.compute_logits(model(ids[:prefill], torch.arange(prefill), caches, meta)))
        for p in range(prefill, len(ids)):
            meta = AttentionMetadata.paged([table[:p // block_size + 1]], [1], [p + 1], block_size)
            rows.append(model.compute_logits(model(ids[p:p + 1], torch.tensor([p]), caches, meta)))
    return torch.cat(rows)


@pytest.mark.parametrize("length", [1, 7, 33])
def test_all_positions_match_transformers(pair, length):
    ref, ours = pair
    ids = torch.randint(0, 320, (length,), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
    got = full_logits(ours, ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4
    assert (got[-1] - expected[-1]).abs().max().item() < 1e-4


@pytest.mark.parametrize("prefill", [1, 5, 12])
def test_prefill_then_decode_equals_full_forward(pair, prefill):
    _, ours = pair
    ids = torch.randint(0, 320, (21,), generator=torch.Generator().manual_seed(prefill))
    full = full_logits(ours, ids)
    cached = cached_logits(ours, ids, prefill)
    assert cached.shape == full.shape
    assert (cached - full).abs().max().item() < 1e-4


def _prefill_then_decode(model, sequences: list[torch.Tensor], tables: list[list[int]], bs: int = 4) -> torch.Tensor:
    """All prefixes but their last token in one pass, then the last tokens in one decode pass: their logits."""
    layers, n_kv, head_dim = model.kv_shape
    caches = [(torch.zeros(16, bs, n_kv, head_dim), torch.zeros(16, bs, n_kv, head_dim)) for _ in range(layers)]
    lens = [len(x) for x in sequences]
    with torch.inference_mode():
        meta = AttentionMetadata.paged(tables, [n - 1 for n in lens], [n - 1 for n in lens], bs)
        model(torch.cat([x[:-1] for x in sequences]), torch.cat([torch.arange(n - 1) for n in lens]), caches, meta)
        meta = AttentionMetadata.paged(tables, [1] * len(lens), lens, bs)
        last = torch.stack([x[-1] for x in sequences])
        return model.compute_logits(model(last, torch.tensor([n - 1 for n in lens]), caches, meta))


@pytest.mark.parametrize("pair_name", ["llama", "gpt2"])
def test_batched_rows_equal_the_solo_rows_bit_for_bit(pair_name):
    """Two sequences prefilled and decoded together give exactly the logits each gives alone: the
    kernels compute every row the same way whatever else is in the pass (GPT-2 through the same kernels)."""
    _, ours = llama_pair() if pair_name == "llama" else gpt2_pair()
    a = torch.randint(0, 320, (9,), generator=torch.Generator().manual_seed(1))
    b = torch.randint(0, 320, (14,), generator=torch.Generator().manual_seed(2))
    together = _prefill_then_decode(ours, [a, b], [[0, 1, 2], [3, 4, 5, 6]])
    alone_a = _prefill_then_decode(ours, [a], [[0, 1, 2]])
    alone_b = _prefill_then_decode(ours, [b], [[3, 4, 5, 6]])
    assert torch.equal(together[0], alone_a[0]) and torch.equal(together[1], alone_b[0])
    full_a = full_logits(ours, a)
    assert (together[0] - full_a[-1]).abs().max().item() < 1e-4


def test_compiled_stages_match_eager():
    """LLM(compile=True): the torch.compile'd layer stages give the eager logits, prefill and decode."""
    ref, ours = llama_pair(seed=9)
    ids = torch.randint(0, 320, (13,), generator=torch.Generator().manual_seed(9))
    eager_full, eager_cached = full_logits(ours, ids), cached_logits(ours, ids, prefill=6)
    ours.compile_stages()
    assert (full_logits(ours, ids) - eager_full).abs().max().item() < 1e-4
    assert (cached_logits(ours, ids, prefill=6) - eager_cached).abs().max().item() < 1e-4

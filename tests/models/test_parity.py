"""Logits of nextok's own models equal transformers' for the same weights (float32, CPU)."""

from __future__ import annotations

import pytest
import torch

from nextok.models.attention import AttentionMetadata

from .helpers import ARCH_CONFIGS, arch_pair, gpt2_pair, llama_pair

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
    for name in ARCH_CONFIGS:
        yield pytest.param(lambda name=name: arch_pair(name), id=name)


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


# ------------------------------------------------------------------ newer architectures, sliding windows
def chunked_logits(model, ids: torch.Tensor, chunk: int, block_size: int = 4) -> torch.Tensor:
    """The whole sequence through a paged cache, `chunk` tokens a pass (1: every token decoded alone)."""
    layers, n_kv, head_dim = model.kv_shape
    caches = [(torch.zeros(32, block_size, n_kv, head_dim), torch.zeros(32, block_size, n_kv, head_dim))
              for _ in range(layers)]
    table = list(range(31, 0, -2))  # scattered, out-of-order blocks
    rows = []
    with torch.inference_mode():
        for start in range(0, len(ids), chunk):
            end = min(start + chunk, len(ids))
            meta = AttentionMetadata.paged([table[:-(-end // block_size)]], [end - start], [end], block_size)
            rows.append(model.compute_logits(model(ids[start:end], torch.arange(start, end), caches, meta)))
    return torch.cat(rows)


@pytest.mark.parametrize("chunk", [1, 3, 8])
@pytest.mark.parametrize("name", list(ARCH_CONFIGS))
def test_chunks_through_the_cache_match_transformers(name, chunk):
    """Prefill in chunks (or decode token by token) past the sliding windows: every position's logits
    are transformers' for the whole sequence."""
    ref, ours = arch_pair(name, seed=2)
    ids = torch.randint(0, 320, (30,), generator=torch.Generator().manual_seed(chunk))
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
    assert (chunked_logits(ours, ids, chunk) - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", [n for n, (_, _, cfg) in ARCH_CONFIGS.items() if "sliding_window" in cfg])
def test_windowed_batch_matches_transformers(name):
    """A sequence inside its window and one past it, prefilled then decoded together."""
    ref, ours = arch_pair(name, seed=5)
    assert ours.config.layer_windows
    assert getattr(ours, "decoder_weights", lambda: None)() is None  # the fused step has no windows
    a = torch.randint(0, 320, (4,), generator=torch.Generator().manual_seed(1))
    b = torch.randint(0, 320, (19,), generator=torch.Generator().manual_seed(2))
    together = _prefill_then_decode(ours, [a, b], [[0, 1], [3, 4, 5, 6, 7]])
    for row, ids in zip(together, (a, b)):
        with torch.no_grad():
            expected = ref(ids[None]).logits[0, -1]
        assert (row - expected).abs().max().item() < 1e-4


def test_a_window_as_long_as_the_context_is_full_attention():
    """Mistral configs whose window covers max_position_embeddings keep the fused kernel step."""
    _, ours = arch_pair("mistral-sliding", sliding_window=256)
    assert ours.config.layer_windows == ()
    assert (ours.decoder_weights() is None) == (llama_pair()[1].decoder_weights() is None)
    _, qwen3 = arch_pair("qwen3")
    assert qwen3.config.qk_norm and qwen3.decoder_weights() is None  # q/k norms: the per-op path


def test_gemma3_conditional_generation_runs_its_language_model(tmp_path):
    """A Gemma 3 checkpoint with a vision tower, saved as on the Hub: nextok runs its text part."""
    import transformers

    from nextok.models.loader import load_checkpoint
    from nextok.models.registry import build_model

    torch.manual_seed(0)
    text = dict(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=6,
                sliding_window_pattern=2, initializer_range=0.2)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=300, boi_token_index=301, eoi_token_index=302)
    ref = transformers.Gemma3ForConditionalGeneration(config).eval()
    ref.save_pretrained(tmp_path)
    checkpoint = load_checkpoint(tmp_path)
    ours = build_model(checkpoint.config, checkpoint.state_dict)
    ids = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(input_ids=ids[None]).logits[0]
    assert (full_logits(ours, ids) - expected).abs().max().item() < 1e-4
    assert (chunked_logits(ours, ids, 3) - expected).abs().max().item() < 1e-4

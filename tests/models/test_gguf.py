"""nextok/models/gguf.py through load_checkpoint: GGUF files, their quantization types, and the GGUF cache.

Parity references: `gguf.quants.dequantize` for every quantization type, and transformers' own GGUF loading
(`from_pretrained(dir, gguf_file=...)`) for small GGUF files written from random models.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize

from nextok.models import loader
from nextok.models.gguf import dequantize
from nextok.models.loader import load_checkpoint
from tests.models.checkpoints import (
    assert_same_state_dict, gpt2_to_gguf, hf_gguf_state_dict, llama_to_gguf, max_diff, quantized,
    reference_state_dict, tiny_arch, tiny_gpt2, tiny_llama, tiny_qwen2, write_gguf,
)

transformers = pytest.importorskip("transformers")


# ------------------------------------------------------------------------------------------ GGUF files

FAST_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1]
FALLBACK_TYPES = [Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL]


@pytest.mark.parametrize("qtype", FAST_TYPES + FALLBACK_TYPES, ids=lambda q: q.name)
def test_dequantize_matches_gguf(qtype: Q, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    shape = (6, 2 * max(block, 32))
    tensors = {}
    if qtype in FAST_TYPES:  # real values through the reference quantizer
        tensors["values"] = quantized(rng.normal(0, 2, shape).astype(np.float32), qtype)
    raw = rng.integers(0, 256, (shape[0], shape[1] // block * type_size), dtype=np.uint8)  # any bit pattern
    tensors["bits"] = (raw, qtype) if qtype != Q.F32 else raw.view(np.float32)
    reader = gguf.GGUFReader(write_gguf(tmp_path / "t.gguf", "llama", {}, tensors))
    for t in reader.tensors:
        with np.errstate(all="ignore"):  # random bits hold NaN and inf scales
            ours, ref = dequantize(t), gguf_dequantize(t.data, t.tensor_type).reshape(shape)
        assert ours.dtype == np.float32 and ours.shape == shape and ours.flags.writeable
        np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_gguf_llama_round_trip(qtype: Q, tmp_path: Path) -> None:
    """q/k rows come back in HF order (the llama.cpp permutation is undone), weights in every type."""
    model = tiny_llama()
    expected = llama_to_gguf(model, tmp_path / "tiny.gguf", qtype)
    ckpt = load_checkpoint(tmp_path / "tiny.gguf", cache_dir=tmp_path / "cache")
    assert_same_state_dict(ckpt.state_dict, expected)
    assert ckpt.config["tie_word_embeddings"] is False and ckpt.tokenizer is None
    if qtype == Q.F32:
        assert_same_state_dict(ckpt.state_dict, reference_state_dict(model))


@pytest.mark.parametrize("make,to_gguf,qtype", [
    (tiny_llama, llama_to_gguf, Q.Q4_1),
    (lambda: tiny_llama(tie=True), llama_to_gguf, Q.Q8_0),
    (tiny_qwen2, llama_to_gguf, Q.Q4_0),
    (tiny_gpt2, gpt2_to_gguf, Q.F32),
    (tiny_gpt2, gpt2_to_gguf, Q.Q8_0),
], ids=["llama-q4_1", "llama-tied-q8_0", "qwen2-tied-q4_0", "gpt2-f32", "gpt2-q8_0"])
def test_gguf_matches_transformers(make, to_gguf, qtype: Q, tmp_path: Path) -> None:
    model = make()
    path = tmp_path / "tiny.gguf"
    expected = to_gguf(model, path, qtype)
    ckpt = load_checkpoint(path, cache_dir=tmp_path / "cache")
    ref, ref_config = hf_gguf_state_dict(path)
    assert_same_state_dict(ckpt.state_dict, ref, atol=1e-6)
    assert_same_state_dict(ckpt.state_dict, expected)
    assert ckpt.config["tie_word_embeddings"] == ref_config.tie_word_embeddings
    assert ckpt.config["architectures"] == [type(model).__name__]
    if isinstance(model, transformers.Qwen2ForCausalLM):
        assert "model.layers.1.self_attn.k_proj.bias" in ckpt.state_dict  # q/k/v biases, rows not permuted
    if isinstance(model, transformers.GPT2LMHeadModel):
        assert ckpt.config["tie_word_embeddings"] is False  # llama.cpp writes output.weight for GPT-2
        for key in ("n_embd", "n_head", "n_layer", "n_positions", "layer_norm_epsilon"):
            assert ckpt.config[key] == pytest.approx(getattr(model.config, key), rel=1e-6), key
        assert ckpt.config["layer_norm_epsilon"] == ref_config.layer_norm_epsilon  # the float32 stored in the file
        assert ckpt.config["vocab_size"] == model.config.vocab_size


def test_gguf_dtype_first_and_cached(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    expected = {k: v.to(torch.bfloat16) for k, v in llama_to_gguf(tiny_llama(), path, Q.Q4_1).items()}
    for _ in ("converted", "cached"):
        ckpt = load_checkpoint(path, dtype=torch.bfloat16, cache_dir=tmp_path / "cache")
        assert_same_state_dict(ckpt.state_dict, expected)
    with torch.no_grad():  # the tensors are the caller's own, not a read-only view of a file
        ckpt.state_dict["model.norm.weight"].add_(1)


def test_gguf_mistral_is_named_by_general_name(tmp_path: Path) -> None:
    path = tmp_path / "mistral.gguf"
    expected = llama_to_gguf(tiny_llama(), path, Q.F32, name="Mistral 7B Instruct v0.3")
    ckpt = load_checkpoint(path, cache_dir=tmp_path / "cache")
    assert ckpt.config["architectures"] == ["MistralForCausalLM"] and ckpt.config["model_type"] == "mistral"
    assert_same_state_dict(ckpt.state_dict, expected)  # still stored with llama's q/k permutation


def test_gguf_cache_is_written_atomically(tmp_path: Path, monkeypatch) -> None:
    import safetensors.torch

    path = tmp_path / "tiny.gguf"
    expected = llama_to_gguf(tiny_llama(), path, Q.Q8_0)
    cache = tmp_path / "cache"
    real_save = safetensors.torch.save_file

    def killed_mid_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        load_checkpoint(path, cache_dir=cache)
    folder = loader.gguf_cache_folder(path, cache)
    assert list(folder.parent.iterdir()) == []  # neither a half cache nor a temporary folder
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    stale = folder.parent / f".{folder.name}.killed.tmp"  # what a `kill -9` mid-write leaves
    (stale / "model.safetensors").parent.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a file")
    os.utime(stale, (time.time() - 2 * 3600,) * 2)
    assert_same_state_dict(load_checkpoint(path, cache_dir=cache).state_dict, expected)
    assert set(folder.parent.iterdir()) == {folder, folder.parent / "digests.json"}

    # a cache damaged afterwards (disk trouble) is noticed, rebuilt, and never returned
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="damaged GGUF cache"):
        assert_same_state_dict(load_checkpoint(path, cache_dir=cache).state_dict, expected)
    assert (folder / "model.safetensors").read_bytes() == data


def test_gguf_unwritable_cache_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    expected = llama_to_gguf(tiny_llama(), path, Q.F16)
    (tmp_path / "not-a-dir").write_text("")
    with pytest.warns(UserWarning, match="cannot write the GGUF cache"):
        ckpt = load_checkpoint(path, cache_dir=tmp_path / "not-a-dir")
    assert_same_state_dict(ckpt.state_dict, expected)


# ------------------------------------------------------------------------------------------ newer architectures

def _gguf_logits_match(model, path: Path, cache: Path, atol: float = 1e-4) -> None:
    """The GGUF loaded and built by nextok gives the logits of the model it was written from."""
    from nextok.models.registry import build_model

    ckpt = load_checkpoint(path, cache_dir=cache)
    ours = build_model(ckpt.config, ckpt.state_dict)
    ids = torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got = ours.compute_logits(ours(ids, torch.arange(len(ids))))
        expected = model(ids[None]).logits[0]
    assert max_diff(got, expected) < atol


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("make", [
    lambda: tiny_arch("Qwen3Config", "Qwen3ForCausalLM", head_dim=24),
    lambda: tiny_arch("Qwen3Config", "Qwen3ForCausalLM", head_dim=16, tie_word_embeddings=True),
    lambda: tiny_arch("Phi3Config", "Phi3ForCausalLM", sliding_window=9),
], ids=["qwen3", "qwen3-tied", "phi3-sliding"])
def test_gguf_newer_architecture_round_trip(make, qtype: Q, tmp_path: Path) -> None:
    """q/k norms (Qwen3), fused qkv and gate/up (Phi-3) and head_dim / sliding window from the metadata."""
    model = make()
    path = tmp_path / "tiny.gguf"
    expected = llama_to_gguf(model, path, qtype)
    ckpt = load_checkpoint(path, cache_dir=tmp_path / "cache")
    assert_same_state_dict(ckpt.state_dict, expected)
    assert ckpt.config["architectures"] == [type(model).__name__]
    assert ckpt.config["tie_word_embeddings"] == model.config.tie_word_embeddings
    if isinstance(model, transformers.Qwen3ForCausalLM):
        assert ckpt.config["head_dim"] == model.config.head_dim
    else:
        assert ckpt.config["sliding_window"] == 9
    if qtype == Q.F32:
        _gguf_logits_match(model, path, tmp_path / "cache")


@pytest.mark.parametrize("make", [
    lambda: tiny_arch("Qwen3Config", "Qwen3ForCausalLM", head_dim=128),  # transformers reads no head_dim for qwen3
    lambda: tiny_arch("Phi3Config", "Phi3ForCausalLM"),
], ids=["qwen3", "phi3"])
def test_gguf_newer_architecture_matches_transformers(make, tmp_path: Path) -> None:
    model = make()
    path = tmp_path / "tiny.gguf"
    llama_to_gguf(model, path, Q.Q8_0)
    ref, ref_config = hf_gguf_state_dict(path)
    ckpt = load_checkpoint(path, cache_dir=tmp_path / "cache")
    assert_same_state_dict(ckpt.state_dict, ref, atol=1e-6)
    assert ckpt.config["tie_word_embeddings"] == ref_config.tie_word_embeddings


def test_gguf_long_context_phi3_is_refused(tmp_path: Path) -> None:
    """LongRoPE factors in the file: the build names what is not supported instead of computing wrong logits."""
    from nextok.models.registry import build_model

    model = tiny_arch("Phi3Config", "Phi3ForCausalLM")
    path = tmp_path / "tiny.gguf"
    llama_to_gguf(model, path, Q.F32)
    reader = gguf.GGUFReader(path)
    tensors = {t.name: np.array(t.data) for t in reader.tensors} | {
        "rope_factors_long.weight": np.ones(4, np.float32), "rope_factors_short.weight": np.ones(4, np.float32)}
    meta = {f.name: f.contents() for f in reader.fields.values() if f.name.startswith("phi3.")}
    write_gguf(tmp_path / "long.gguf", "phi3", meta, tensors)
    with pytest.warns(UserWarning, match="rope_factors"):
        ckpt = load_checkpoint(tmp_path / "long.gguf", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="longrope"):
        build_model(ckpt.config, ckpt.state_dict)


GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
               "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}}


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("make", [
    lambda: tiny_arch("Gemma2Config", "Gemma2ForCausalLM", head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
                      attn_logit_softcapping=2.0, final_logit_softcapping=20.0, num_hidden_layers=3),
    lambda: tiny_arch("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=16, query_pre_attn_scalar=16, sliding_window=6,
                      num_hidden_layers=7, rope_parameters=GEMMA3_ROPE),
], ids=["gemma2", "gemma3"])
def test_gguf_gemma_round_trip(make, qtype: Q, tmp_path: Path) -> None:
    """Norm weights come back minus the one llama.cpp added; soft-caps, window and rope bases from the metadata."""
    model = make()
    path = tmp_path / "tiny.gguf"
    expected = llama_to_gguf(model, path, qtype)
    ckpt = load_checkpoint(path, cache_dir=tmp_path / "cache")
    assert_same_state_dict(ckpt.state_dict, expected)
    assert ckpt.config["architectures"] == [type(model).__name__] and ckpt.config["tie_word_embeddings"]
    ref, _ = hf_gguf_state_dict(path)
    assert_same_state_dict(ckpt.state_dict, ref, atol=1e-6)
    if qtype == Q.F32:
        _gguf_logits_match(model, path, tmp_path / "cache")

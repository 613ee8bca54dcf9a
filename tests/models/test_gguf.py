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
    assert_same_state_dict, gpt2_to_gguf, hf_gguf_state_dict, llama_to_gguf, quantized, reference_state_dict,
    tiny_gpt2, tiny_llama, tiny_qwen2, write_gguf,
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
    assert list(cache.iterdir()) == []  # neither a half cache nor a temporary folder
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    folder = loader.gguf_cache_folder(path, cache)
    stale = cache / f".{folder.name}.killed.tmp"  # what a `kill -9` mid-write leaves
    (stale / "model.safetensors").parent.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a file")
    os.utime(stale, (time.time() - 2 * 3600,) * 2)
    assert_same_state_dict(load_checkpoint(path, cache_dir=cache).state_dict, expected)
    assert list(cache.iterdir()) == [folder]

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

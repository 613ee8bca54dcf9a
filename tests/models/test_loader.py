"""nextok/models/loader.py: the default model, HF folders, the GGUF cache's location, and load errors.

Parity references: transformers' own GGUF loading (`from_pretrained(dir, gguf_file=...)`) for the default
model, and `model.state_dict()` for folders written by `save_pretrained`. With tied embeddings, nextok's
state dict has no `lm_head.weight` (the model ties it); transformers' state dict shows the embedding there.
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

from nextok.errors import ModelLoadError
from nextok.models import loader
from nextok.models.loader import Checkpoint, load_checkpoint
from nextok.models.registry import ARCHITECTURES
from nextok.paths import default_model_path
from tests.models.checkpoints import (
    assert_same_state_dict, llama_to_gguf, reference_state_dict, tiny_gpt2, tiny_llama, write_gguf,
)

transformers = pytest.importorskip("transformers")


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
    assert {p.name for p in folder.parent.iterdir()} == {folder.name, "digests.json"}  # no temporary folder left
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
    assert_load_error(tmp_path, "BertModel", *ARCHITECTURES)


def test_error_unsupported_gguf_architecture(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "falcon.gguf", "falcon", {}, {"token_embd.weight": np.zeros((4, 32), np.float32)})
    assert_load_error(path, "falcon", *(a.name for a in ARCHITECTURES.values() if a.gguf_name),
                      cache_dir=tmp_path / "cache")


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


def test_any_other_failure_in_a_library_is_one_line_naming_the_file(tmp_path: Path, monkeypatch) -> None:
    """A damaged file can fail deep in numpy, struct or safetensors with any exception: it still ends as
    one ModelLoadError line with the path, not a traceback."""
    import struct

    from nextok.models import gguf as gguf_module

    path = tmp_path / "tiny.gguf"
    llama_to_gguf(tiny_llama(), path, Q.Q8_0)

    def broken(*args, **kwargs):
        raise struct.error("unpack requires a buffer of 4 bytes")

    monkeypatch.setattr(gguf_module, "gguf_state_dict", broken)
    assert_load_error(path, "cannot load it", "error: unpack requires a buffer of 4 bytes", cache_dir=tmp_path / "c")


# ------------------------------------------------------------------------------------------ the GGUF cache's key

def _no_conversion(*args, **kwargs):
    raise AssertionError("the GGUF was converted again instead of read from the cache")


def test_gguf_cache_is_keyed_on_content(tmp_path: Path, monkeypatch) -> None:
    """A reinstall (the same bytes at a new path with a new mtime) reads the conversion it made before,
    and a file loaded again is not hashed again (its digest is remembered per path, size and mtime)."""
    from nextok.models import gguf_cache

    first, cache = tmp_path / "a" / "tiny.gguf", tmp_path / "cache"
    first.parent.mkdir()
    expected = llama_to_gguf(tiny_llama(), first, Q.F16)
    load_checkpoint(first, cache_dir=cache)
    folders = [p for p in gguf_cache.cache_root(cache).iterdir() if p.is_dir()]
    assert [p.name for p in folders] == [loader.gguf_cache_folder(first, cache).name]

    moved = tmp_path / "b" / "renamed.gguf"
    moved.parent.mkdir()
    shutil.copyfile(first, moved)
    os.utime(moved, ns=(first.stat().st_mtime_ns + 10**9,) * 2)
    monkeypatch.setattr(loader, "read_gguf", _no_conversion)
    assert_same_state_dict(load_checkpoint(moved, cache_dir=cache).state_dict, expected)
    assert [p for p in gguf_cache.cache_root(cache).iterdir() if p.is_dir()] == folders

    def no_hashing(*args):
        raise AssertionError("the file was hashed again")

    monkeypatch.setattr(gguf_cache.hashlib, "sha256", no_hashing)
    assert_same_state_dict(load_checkpoint(moved, cache_dir=cache).state_dict, expected)
    moved.write_bytes(moved.read_bytes()[:-1] + b"\0")  # new content: new size or mtime, so hashed again
    with pytest.raises(ModelLoadError, match="hashed again"):
        load_checkpoint(moved, cache_dir=cache)


def test_gguf_cache_removes_old_versions_and_unused_conversions(tmp_path: Path, monkeypatch) -> None:
    from nextok.models import gguf_cache

    cache = tmp_path / "cache"
    legacy = cache / f"tiny-1234-{10**18}-v1"  # version 1's name: stem, size, mtime
    old_version = gguf_cache.cache_root(cache) / f"{'a' * 32}-v1"
    unused = gguf_cache.cache_root(cache) / f"{'b' * 32}-v{gguf_cache.CACHE_FORMAT_VERSION}"
    recent = gguf_cache.cache_root(cache) / f"{'c' * 32}-v{gguf_cache.CACHE_FORMAT_VERSION}"
    kernels = cache / "kernels" / "libnextok-1-2-v1"  # not a conversion: never touched
    for folder in (legacy, old_version, unused, recent, kernels):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    month = time.time() - (gguf_cache.MAX_UNUSED_DAYS + 1) * 86400
    os.utime(unused, (month, month))

    path = tmp_path / "tiny.gguf"
    llama_to_gguf(tiny_llama(), path, Q.F16)
    load_checkpoint(path, cache_dir=cache)
    used = loader.gguf_cache_folder(path, cache)
    assert sorted(p.name for p in cache.iterdir()) == ["gguf", "kernels"]
    assert {p for p in gguf_cache.cache_root(cache).iterdir() if p.is_dir()} == {used, recent}
    assert kernels.is_dir()

    # beyond the size budget, the least recently used go first, never the one in use
    monkeypatch.setattr(gguf_cache, "MAX_CACHE_BYTES", 1)
    load_checkpoint(path, cache_dir=cache)
    assert [p for p in gguf_cache.cache_root(cache).iterdir() if p.is_dir()] == [used]

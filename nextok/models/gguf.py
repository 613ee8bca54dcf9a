"""GGUF files -> an HF config dict and an HF-named float32 state dict.

The GGUF is memory-mapped by `gguf.GGUFReader`; every tensor is dequantized with vectorised numpy code
(F32, F16, BF16, Q8_0, Q4_0, Q4_1) or `gguf.quants.dequantize` (K-quants, IQ-quants, ...) (or, where
the model will keep it in blocks, left as raw blocks: gguf_blocks.QuantizedWeight), then renamed
to its Hugging Face key and brought back to the HF layout: llama.cpp's convert_hf_to_gguf permutes the
rows of Llama q_proj/k_proj for its rotary kernel and stores GPT-2's Conv1D weights transposed.
Config and tied embeddings follow what `transformers` does for the same file: `tie_word_embeddings`
is true exactly when the file has no `output.weight`.
"""

from __future__ import annotations

import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader

from nextok.errors import ModelLoadError
from nextok.models.gguf_archs import BLOCK_NAMES, NORMS_PLUS_ONE, arch_config
from nextok.models.gguf_blocks import BLOCK_TYPES, QuantizedWeight, dequantize_rows
from nextok.models.registry import ARCHITECTURES
from nextok.tokenizer import Tokenizer

# general.architecture -> the architecture it loads as
GGUF_ARCHITECTURES = {a.gguf_name: a for a in ARCHITECTURES.values() if a.gguf_name}

_LLAMA_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LLAMA_BLOCK = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GPT2_TOP = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe",
             "output_norm": "transformer.ln_f", "output": "lm_head"}
_GPT2_BLOCK = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
               "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
_GPT2_TRANSPOSED = ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")
# Tensors llama.cpp adds that have no HF parameter (transformers skips them too).
_IGNORED = ("rope_freqs.weight", "attn_rot_embd")

_SPECIAL_TOKENS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
                   "padding_token_id": "pad_token_id", "unknown_token_id": "unk_token_id"}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def read_gguf(path: Path, blocks: bool = False) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """Read a GGUF file: (HF config, HF-named float32 state dict, nextok Tokenizer or None).

    blocks: leave the 2-D weights of the types the kernels keep in blocks (gguf_blocks.BLOCK_TYPES)
    as QuantizedWeight, their rows in the HF order, instead of dequantizing them.
    """
    try:
        reader = GGUFReader(path)
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise ModelLoadError(f"{path}: truncated or corrupt GGUF file ({_one_line(e)})") from None
    if reader.byte_order == "S":
        raise ModelLoadError(f"{path}: big-endian GGUF files are not supported")
    file_size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > file_size:
            raise ModelLoadError(f"{path}: truncated GGUF file (tensor {t.name} ends past the end of the file)")
    config = gguf_config(reader, path)
    state_dict = gguf_state_dict(reader, config, path, blocks)
    tokenizer = None
    if "tokenizer.ggml.model" in reader.fields:
        tokenizer = Tokenizer.from_gguf(path, reader=reader)
    return config, state_dict, tokenizer


def gguf_config(reader: Any, path: Path) -> dict[str, Any]:
    """The HF config.json equivalent of a GGUF file's metadata."""
    arch = _meta(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        supported = ", ".join(f"{name} ({a.name})" for name, a in GGUF_ARCHITECTURES.items())
        raise ModelLoadError(f"{path}: unsupported GGUF architecture {arch!r}; supported: {supported}")
    model_type, architecture = GGUF_ARCHITECTURES[arch].model_types[0], GGUF_ARCHITECTURES[arch].name
    name = str(_meta(reader, "general.name", ""))
    if arch == "llama" and "mistral" in name.lower():  # llama.cpp stores Mistral as llama
        model_type, architecture = "mistral", "MistralForCausalLM"

    def m(key: str, default: Any = None) -> Any:
        return _meta(reader, f"{arch}.{key}", default)

    names = {t.name for t in reader.tensors}
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab_size = m("vocab_size") or (int(embedding.shape[-1]) if embedding is not None else None)
    config: dict[str, Any] = {"architectures": [architecture], "model_type": model_type}
    if arch == "gpt2":
        config.update(n_embd=m("embedding_length"), n_head=m("attention.head_count"), n_layer=m("block_count"),
                      n_positions=m("context_length"), n_ctx=m("context_length"), n_inner=m("feed_forward_length"),
                      layer_norm_epsilon=float(m("attention.layer_norm_epsilon", 1e-5)),
                      activation_function="gelu_new")
    else:
        heads = m("attention.head_count")
        config.update(
            hidden_size=m("embedding_length"), intermediate_size=m("feed_forward_length"),
            num_hidden_layers=m("block_count"), num_attention_heads=heads,
            num_key_value_heads=m("attention.head_count_kv", heads),
            max_position_embeddings=m("context_length"),
            rms_norm_eps=float(m("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(m("rope.freq_base", 10000.0)), hidden_act="silu",
        )
        if arch == "llama":  # qwen2's rope.dimension_count is not its head_dim (transformers ignores it too)
            head_dim = m("attention.key_length") or m("rope.dimension_count")
            config["head_dim"] = head_dim or config["hidden_size"] // heads
            config["attention_bias"] = "blk.0.attn_q.bias" in names
        config.update(arch_config(arch, m, names, config))  # qwen3, phi3, gemma2, gemma3
        scaling = m("rope.scaling.type")
        if scaling in ("linear", "yarn"):
            config["rope_scaling"] = {"rope_type": scaling, "factor": float(m("rope.scaling.factor", 1.0))}
            if m("rope.scaling.original_context_length"):
                config["rope_scaling"]["original_max_position_embeddings"] = m("rope.scaling.original_context_length")
    config["vocab_size"] = vocab_size
    config["tie_word_embeddings"] = "output.weight" not in names
    for gguf_key, hf_key in _SPECIAL_TOKENS.items():
        if (token_id := _meta(reader, f"tokenizer.ggml.{gguf_key}")) is not None:
            config[hf_key] = int(token_id)
    return {key: value for key, value in config.items() if value is not None}  # absent: the model's default


def gguf_state_dict(reader: Any, config: dict[str, Any], path: Path,
                    blocks: bool = False) -> dict[str, torch.Tensor | QuantizedWeight]:
    """Every GGUF tensor dequantized to float32 (or kept: a QuantizedWeight), under its HF name and in the HF layout."""
    arch = _meta(reader, "general.architecture")
    named = [(t, hf_tensor_name(t.name, arch)) for t in reader.tensors]
    skipped = [t.name for t, hf_name in named if hf_name is None and not t.name.endswith(_IGNORED)]
    if skipped:
        warnings.warn(f"{path}: ignoring GGUF tensors without an HF counterpart: {', '.join(skipped[:5])}",
                      stacklevel=3)
    if config.get("tie_word_embeddings"):
        named = [(t, hf_name) for t, hf_name in named if hf_name != "lm_head.weight"]

    def convert(t: Any) -> torch.Tensor | QuantizedWeight:
        transposed = arch == "gpt2" and t.name.endswith(_GPT2_TRANSPOSED)
        kept = blocks and t.tensor_type in BLOCK_TYPES and len(t.shape) == 2 and not transposed
        w = t.data if kept else dequantize(t, path)  # kept: (rows, bytes a row), a view of the file
        if arch == "llama" and re.search(r"\.attn_[qk]\.", t.name):
            heads = config["num_attention_heads"] if ".attn_q." in t.name else config["num_key_value_heads"]
            w = unpermute_rotary(w, heads)
        elif transposed:
            w = np.ascontiguousarray(w.T)  # GGUF (out, in) -> Conv1D (in, out)
        elif arch in NORMS_PLUS_ONE and t.name.endswith("norm.weight"):
            w = w - np.float32(1.0)  # llama.cpp stored 1 + weight
        if kept:
            return QuantizedWeight(w, t.tensor_type, (int(t.shape[1]), int(t.shape[0])))
        return torch.from_numpy(w)

    # numpy releases the GIL: one tensor per thread uses every core without fine-grained barriers
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        tensors = pool.map(convert, [t for t, hf_name in named if hf_name is not None])
        return dict(zip([hf_name for _, hf_name in named if hf_name is not None], tensors))


def hf_tensor_name(gguf_name: str, arch: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight` (None if there is no HF twin)."""
    top, block, layers = ((_GPT2_TOP, _GPT2_BLOCK, "transformer.h") if arch == "gpt2"
                          else (_LLAMA_TOP, {**_LLAMA_BLOCK, **BLOCK_NAMES.get(arch, {})}, "model.layers"))
    if match := _BLOCK_NAME.fullmatch(gguf_name):
        index, base, kind = match.groups()
        return f"{layers}.{index}.{block[base]}.{kind}" if base in block else None
    base, _, kind = gguf_name.rpartition(".")
    return f"{top[base]}.{kind}" if base in top else None


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's `permute` of q/k rows: per head, (2, d/2) halves were interleaved to (d/2, 2)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(tensor: Any, path: Path | None = None) -> np.ndarray:
    """A GGUF ReaderTensor as a new float32 array of its logical shape (a copy, never the mmap)."""
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    try:
        return dequantize_rows(tensor.data, tensor.tensor_type, shape)
    except NotImplementedError:
        raise ModelLoadError(f"{path}: tensor {tensor.name} has GGUF quantization type {tensor.tensor_type.name}, "
                             f"which nextok cannot dequantize") from None


def _meta(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__

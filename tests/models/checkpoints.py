"""Tiny checkpoints for the loader tests: random HF models, and GGUF files written from them."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

transformers = pytest.importorskip("transformers")


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


def tiny_arch(config_class: str, model_class: str, **overrides) -> torch.nn.Module:
    """A tiny random model of a newer Llama-like architecture (Qwen3, Phi-3, Gemma)."""
    torch.manual_seed(0)
    kwargs = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0) | overrides
    return _randomized(getattr(transformers, model_class)(getattr(transformers, config_class)(**kwargs)))


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
ARCH_BLOCK = {  # llama.cpp's names where they differ from Llama's (gguf MODEL_TENSORS, tensor_mapping)
    "qwen3": {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"},
    "phi3": {"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"},
    "gemma2": {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm"},
}
ARCH_BLOCK["gemma3"] = {**ARCH_BLOCK["gemma2"], **ARCH_BLOCK["qwen3"]}
GPT2_BLOCK = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
              "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def llama_to_gguf(model: torch.nn.Module, path: Path, qtype: Q, name: str = "tiny") -> dict[str, torch.Tensor]:
    """Write a Llama, Qwen2, Qwen3, Phi-3 or Gemma 2 / 3 `model` as llama.cpp would (2-D weights in `qtype`):
    the state dict to expect back."""
    c = model.config
    arch = {"gemma3_text": "gemma3"}.get(c.model_type, c.model_type)  # "llama", "qwen2", "qwen3", "phi3", ...
    gemma = arch in ("gemma2", "gemma3")
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    meta = {"block_count": c.num_hidden_layers, "context_length": c.max_position_embeddings,
            "embedding_length": c.hidden_size, "feed_forward_length": c.intermediate_size,
            "attention.head_count": c.num_attention_heads, "attention.head_count_kv": c.num_key_value_heads,
            "rope.freq_base": float(rope["rope_theta"]),
            "attention.layer_norm_rms_epsilon": float(c.rms_norm_eps), "vocab_size": c.vocab_size,
            "rope.dimension_count": c.hidden_size // c.num_attention_heads}
    if arch == "qwen3" or gemma:
        meta["attention.key_length"] = meta["attention.value_length"] = c.head_dim
    if gemma:
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(c, key) is not None:
                meta[key] = float(getattr(c, key))
    if arch == "gemma3":
        meta["rope.freq_base_swa"] = float(c.rope_parameters["sliding_attention"]["rope_theta"])
        if rope.get("rope_type") == "linear":
            meta["rope.scaling.type"], meta["rope.scaling.factor"] = "linear", float(rope["factor"])
    if getattr(c, "sliding_window", None):
        meta["attention.sliding_window"] = c.sliding_window
    meta = {f"{arch}.{key}": value for key, value in meta.items()} | {"general.name": name}
    if arch == "phi3":  # else transformers takes Phi-3's default ids, outside a tiny vocabulary
        meta |= {f"tokenizer.ggml.{key}_token_id": getattr(c, f"{key}_token_id") for key in ("bos", "eos")}
        meta["tokenizer.ggml.padding_token_id"] = c.pad_token_id
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
            name = f"blk.{layer}.{(LLAMA_BLOCK | ARCH_BLOCK.get(arch, {}))[module]}.{kind}"
        stored = w
        if gemma and name.endswith("norm.weight"):  # llama.cpp's RMSNorm multiplies by the weight: 1 + Gemma's
            stored = w + np.float32(1.0)
            w = stored - np.float32(1.0)  # what a reader gets back in float32
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

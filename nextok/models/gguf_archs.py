"""How llama.cpp's convert_hf_to_gguf writes the architectures that differ from Llama's layout:
their extra tensor names, and the config values only their metadata holds.

- qwen3: per-head q/k norms (`attn_q_norm`, `attn_k_norm`); head_dim in `attention.key_length`.
- phi3: q/k/v fused in `attn_qkv`, gate/up fused in `ffn_up` (the names Phi-3's checkpoints use);
  long-context files carry `rope_factors_long` / `rope_factors_short` (LongRoPE).
- gemma2, gemma3: four norms a layer (`ffn_norm` is the pre-feedforward norm there), every norm weight
  stored plus one (llama.cpp's RMSNorm multiplies by the weight, Gemma's by 1 + weight), soft-capping
  and the sliding window in the metadata, no `output.weight` (the head is the embedding).
"""

from __future__ import annotations

from typing import Any, Callable

# general.architecture -> GGUF block tensor names that differ from Llama's, and their HF module names
BLOCK_NAMES: dict[str, dict[str, str]] = {
    "qwen3": {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
    "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
    "gemma2": {"post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"},
}
BLOCK_NAMES["gemma3"] = {**BLOCK_NAMES["gemma2"], **BLOCK_NAMES["qwen3"]}

# Architectures whose norm weights llama.cpp stores as 1 + the checkpoint's (transformers subtracts it too)
NORMS_PLUS_ONE = ("gemma2", "gemma3")

# Layer counts of the Gemma models whose query_pre_attn_scalar is hidden / heads, not head_dim (the 27B
# ones); llama.cpp keys its attention scale on the model size the same way, as the file does not hold it.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def arch_config(arch: str, m: Callable[..., Any], names: set[str], config: dict[str, Any]) -> dict[str, Any]:
    """The config.json entries of `arch` beyond the Llama ones gguf_config reads; m(key) reads `{arch}.key`."""
    heads = config["num_attention_heads"]
    if arch == "qwen3":
        return {"head_dim": m("attention.key_length") or 128, "attention_bias": False}
    if arch == "phi3":
        extra: dict[str, Any] = {"sliding_window": m("attention.sliding_window")}
        if "rope_factors_long.weight" in names:  # refused when the model is built, with its name
            extra["rope_scaling"] = {"rope_type": "longrope"}
        return extra
    if arch in ("gemma2", "gemma3"):
        head_dim = m("attention.key_length") or config["hidden_size"] // heads
        big = config["num_hidden_layers"] == _GEMMA_27B_LAYERS[arch]
        extra = {"head_dim": head_dim, "hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh",
                 "query_pre_attn_scalar": config["hidden_size"] // heads if big else head_dim,
                 "sliding_window": m("attention.sliding_window"),
                 "attn_logit_softcapping": m("attn_logit_softcapping"),
                 "final_logit_softcapping": m("final_logit_softcapping")}
        if arch == "gemma3":
            extra["rope_local_base_freq"] = float(m("rope.freq_base_swa", 10000.0))
            pattern = m("attention.sliding_window_pattern", 6)
            if isinstance(pattern, list):  # one flag a layer
                extra["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
            else:
                extra["sliding_window_pattern"] = int(pattern)
        return extra
    return {}

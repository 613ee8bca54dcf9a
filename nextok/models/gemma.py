"""Gemma 2 and Gemma 3 (text): Llama-like decoders with their own details.

RMSNorm that scales by (1 + weight), computed in float32; the token embeddings scaled by sqrt(hidden)
in the model's dtype; GeGLU (GELU, tanh approximation) MLP; four norms a layer (before and after the
attention, before and after the MLP); attention scaled by query_pre_attn_scalar**-0.5; sliding-window
layers (Gemma 2: every other one, Gemma 3: five of six) and full-attention layers. Gemma 2 soft-caps
the attention logits and the final logits (cap * tanh(x / cap)); Gemma 3 normalises each q and k head
instead and gives its sliding-window layers their own rope base (rope_local_base_freq). Attribute names
follow the checkpoint keys. The attention runs on PyTorch where it soft-caps or a window is exceeded
(models/attention.attend); there is no fused kernel step for these layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nextok.kernels import ops
from nextok.models.attention import AttentionMetadata, LayerKV, attend
from nextok.models.hf_config import layer_windows, rope_settings, sliding_layers
from nextok.models.llama import RotaryEmbedding, base_inv_freq, fuse_linears

# transformers' defaults where config.json leaves a value out
_DEFAULTS = {
    "gemma2": dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0, rope_theta=10000.0),
    "gemma3_text": dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=None,
                        final_logit_softcapping=None, rope_theta=1_000_000.0, rope_local_base_freq=10000.0),
}
_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh")


@dataclass
class GemmaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    query_pre_attn_scalar: float
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # full-attention layers ("linear" in Gemma 3)
    rope_local_theta: float | None = None  # sliding-window layers' base (Gemma 3); None: rope_theta
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    qk_norm: bool = False  # Gemma 3
    layer_windows: tuple[int | None, ...] = ()
    local_rope_layers: tuple[bool, ...] = ()  # the layers that rotate with rope_local_theta (Gemma 3)

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        kind = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if kind not in ("default", "linear"):
            raise ValueError(f"Gemma rope_scaling type {kind!r} is not supported; supported: none, 'linear'")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> GemmaConfig:
        if "text_config" in cfg:  # Gemma3ForConditionalGeneration: its language model
            cfg = {**cfg["text_config"], "model_type": "gemma3_text",
                   "tie_word_embeddings": cfg.get("tie_word_embeddings", True)}
        model_type = cfg.get("model_type")
        gemma3 = model_type in ("gemma3_text", "gemma3")
        defaults = _DEFAULTS["gemma3_text" if gemma3 else "gemma2"]
        cfg = {**cfg, "model_type": "gemma3_text" if gemma3 else "gemma2"}

        def get(key: str) -> Any:
            return cfg[key] if key in cfg else defaults.get(key)

        activation = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
        if activation not in _ACTIVATIONS:
            raise ValueError(f"Gemma hidden_activation {activation!r} is not supported; supported: 'gelu_pytorch_tanh'")
        if cfg.get("use_bidirectional_attention"):
            raise ValueError("Gemma use_bidirectional_attention=True (an encoder) is not supported; "
                             "supported: causal attention")
        heads = cfg["num_attention_heads"]
        cfg.setdefault("sliding_window", defaults["sliding_window"])
        if gemma3:
            theta, scaling = rope_settings(cfg, "full_attention")
            local, _ = rope_settings(cfg, "sliding_attention")
            if not isinstance((cfg.get("rope_parameters") or {}).get("sliding_attention"), dict):
                local = cfg.get("rope_local_base_freq")  # the older config.json form
            local = float(local or defaults["rope_local_base_freq"])
        else:
            (theta, scaling), local = rope_settings(cfg), None
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads, head_dim=get("head_dim"),
            query_pre_attn_scalar=float(get("query_pre_attn_scalar")), rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta or defaults["rope_theta"]), rope_scaling=scaling, rope_local_theta=local,
            max_position_embeddings=cfg.get("max_position_embeddings", 8192),
            tie_word_embeddings=cfg.get("tie_word_embeddings", True), attention_bias=cfg.get("attention_bias", False),
            attn_logit_softcapping=get("attn_logit_softcapping"),
            final_logit_softcapping=get("final_logit_softcapping"),
            qk_norm=gemma3, layer_windows=layer_windows(cfg, cfg["num_hidden_layers"]),
            local_rope_layers=sliding_layers(cfg, cfg["num_hidden_layers"]) if gemma3 else (),
        )


# Gemma3ForConditionalGeneration's language model under Gemma3ForCausalLM's names: as saved on the Hub
# (`language_model.model.`, which the HF-folder loader prefixes with `model.`) and as transformers names it
_LANGUAGE_MODEL_PREFIXES = (("model.language_model.model.", "model."), ("model.language_model.lm_head.", "lm_head."),
                            ("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                            ("model.language_model.", "model."))
_VISION_PARTS = ("vision_tower.", "multi_modal_projector.")


def language_model_weights(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A Gemma3ForConditionalGeneration checkpoint's text weights, named as Gemma3ForCausalLM's."""
    weights = {}
    for key, value in state_dict.items():
        if key.startswith(_VISION_PARTS) or key.startswith(tuple("model." + p for p in _VISION_PARTS)):
            continue
        old, new = next(((o, n) for o, n in _LANGUAGE_MODEL_PREFIXES if key.startswith(o)), ("", ""))
        weights[new + key[len(old):]] = value
    return weights


def _inv_freq(dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Rotary inverse frequencies, with Gemma 3's "linear" scaling where the config asks for it."""
    inv_freq = base_inv_freq(dim, theta)
    if scaling and scaling.get("rope_type", scaling.get("type")) == "linear":
        inv_freq = inv_freq / scaling["factor"]
    return inv_freq


class GemmaRMSNorm(nn.Module):
    """x / rms(x) * (1 + weight), in float32 (as transformers computes it), back to x's dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = torch.rms_norm(x.float(), self.weight.shape, None, self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


class GemmaAttention(nn.Module):
    def __init__(self, config: GemmaConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, hidden, bias=bias)
        if config.qk_norm:
            self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.scale = config.query_pre_attn_scalar**-0.5
        self.softcap = config.attn_logit_softcapping
        self.window = config.layer_windows[layer_idx] if config.layer_windows else None
        self.local_rope = bool(config.local_rope_layers and config.local_rope_layers[layer_idx])

    def fuse(self) -> None:
        """One q/k/v projection instead of three; the checkpoint names are gone after."""
        if not hasattr(self, "qkv_proj"):
            self.qkv_proj = fuse_linears(self.q_proj, self.k_proj, self.v_proj)
            del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: LayerKV | None,
                meta: AttentionMetadata | None) -> torch.Tensor:
        n, heads = x.shape[0], self.n_head + 2 * self.n_kv
        if hasattr(self, "qkv_proj"):
            qkv = self.qkv_proj(x).view(n, heads, self.head_dim)  # (N, H + 2 Hkv, D)
        else:
            qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1).view(n, heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k, v = qkv.split([self.n_head, self.n_kv, self.n_kv], dim=1)
            qkv = torch.cat([self.q_norm(q), self.k_norm(k), v], dim=1)
        qkv, _ = ops.rotate(qkv.contiguous(), cos, sin, self.n_head + self.n_kv)  # q and k rotate together
        q, k, v = qkv.split([self.n_head, self.n_kv, self.n_kv], dim=1)
        out = attend(q, k, v, kv, meta, self.scale, window=self.window, softcap=self.softcap)  # (N, H * D)
        return self.o_proj(out)


class GemmaMLP(nn.Module):
    """down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, config: GemmaConfig) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def fuse(self) -> None:
        if not hasattr(self, "gate_up_proj"):
            self.gate_up_proj = fuse_linears(self.gate_proj, self.up_proj)
            del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (N, inner) each
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: GemmaConfig, layer_idx: int) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.self_attn = GemmaAttention(config, layer_idx)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.mlp = GemmaMLP(config)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)

    def forward(self, x, cos, sin, kv: LayerKV | None, meta: AttentionMetadata | None) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, kv, meta))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaModel(nn.Module):
    def __init__(self, config: GemmaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GemmaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling))
        if config.rope_local_theta is not None:  # Gemma 3's sliding-window layers
            self.rotary_emb_local = RotaryEmbedding(_inv_freq(config.head_dim, config.rope_local_theta, None))


class GemmaForCausalLM(nn.Module):
    """Gemma 2 / Gemma 3 text: forward(input_ids, positions, kv_caches, attn_meta) -> hidden;
    compute_logits(hidden) -> logits (soft-capped where the config says so)."""

    def __init__(self, config: GemmaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = GemmaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        c = self.config
        return c.num_hidden_layers, c.num_key_value_heads, c.head_dim

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings

    def forward(
        self,
        input_ids: torch.Tensor,  # (N,)
        positions: torch.Tensor,  # (N,)
        kv_caches: list[LayerKV] | None = None,
        attn_meta: AttentionMetadata | None = None,
    ) -> torch.Tensor:  # (N, hidden)
        m = self.model
        x = m.embed_tokens(input_ids)  # (N, hidden)
        x = x * torch.tensor(math.sqrt(self.config.hidden_size), dtype=x.dtype)  # rounded to the dtype, as in HF
        rope = m.rotary_emb(positions)
        local = m.rotary_emb_local(positions) if hasattr(m, "rotary_emb_local") else rope
        for i, layer in enumerate(m.layers):
            cos, sin = local if layer.self_attn.local_rope else rope
            x = layer(x, cos, sin, kv_caches[i] if kv_caches else None, attn_meta)
        return m.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # (N, hidden) -> (N, vocab) float32
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return ops.to_float32(logits)

    def fuse(self) -> GemmaForCausalLM:
        """Fuse q/k/v and gate/up projections for inference (fewer, larger matrix products)."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        return self

"""Llama family (Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2, Qwen3, Phi-3).

RMSNorm, rotary embeddings (rope_theta, optional "llama3" scaling), grouped-query attention,
SwiGLU MLP, optional q/k/v bias, optional per-head q/k RMSNorm (Qwen3), optional sliding-window
layers (Mistral, Phi-3, Qwen), tied or untied head. Attribute names follow the checkpoint keys;
Phi-3's checkpoints hold q/k/v and gate/up already fused, under the names `fuse` gives them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as nn_module

from nextok.kernels import ops
from nextok.kernels.fused import DecoderLayerWeights, DecoderWeights
from nextok.models.attention import AttentionMetadata, LayerKV, attend
from nextok.models.hf_config import layer_windows, partial_rotary_factor, rope_settings
from nextok.models.linear import QuantizedLinear


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each q and k head before rotary (Qwen3)
    layer_windows: tuple[int | None, ...] = ()  # per layer: its sliding window, None for full attention
    fused_checkpoint: bool = False  # the checkpoint holds qkv_proj and gate_up_proj (Phi-3)

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported; supported: none, 'llama3'")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> LlamaConfig:
        heads, model_type = cfg["num_attention_heads"], cfg.get("model_type")
        qwen2 = model_type == "qwen2"
        rope_theta, rope_scaling = rope_settings(cfg)
        if (partial := partial_rotary_factor(cfg)) != 1.0:
            raise ValueError(f"partial_rotary_factor={partial} (rotary on part of each head) is not supported; "
                             f"supported: 1.0")
        if model_type == "phi3" and (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type")):
            kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
            raise ValueError(f"Phi-3 rope_scaling {kind!r} (the long-context Phi-3 models) is not supported; "
                             f"supported: Phi-3 configs without rope_scaling (e.g. Phi-3-mini-4k)")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or (128 if model_type == "qwen3" else cfg["hidden_size"] // heads),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta or 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=qwen2 or cfg.get("attention_bias", False),
            o_proj_bias=not qwen2 and cfg.get("attention_bias", False),
            mlp_bias=cfg.get("mlp_bias", False),
            qk_norm=model_type == "qwen3",
            layer_windows=layer_windows(cfg, cfg["num_hidden_layers"]),
            fused_checkpoint=model_type == "phi3",
        )


def base_inv_freq(dim: int, theta: float) -> torch.Tensor:
    """Rotary inverse frequencies theta^(-2i/dim), made on the CPU even while a model is built on the meta device."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = base_inv_freq(dim, config.rope_theta)
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_context = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_context / low, old_context / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos and sin of positions times the given inverse frequencies (rope_inv_freq for Llama-family configs)."""

    def __init__(self, inv_freq: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # (N, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (N, D)
        return emb.cos(), emb.sin()  # (N, D) float32 each


def fuse_linears(*linears: nn.Linear | QuantizedLinear) -> nn.Linear | QuantizedLinear:
    """A linear layer whose output is the concatenation of the given layers' outputs (still in blocks where
    all of them are)."""
    if all(isinstance(lin, QuantizedLinear) for lin in linears):
        return QuantizedLinear.fuse(*linears)
    linears = [lin.dense() if isinstance(lin, QuantizedLinear) else lin for lin in linears]
    weight = torch.cat([lin.weight for lin in linears])  # (sum of outs, in)
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=linears[0].bias is not None,
                      device=weight.device, dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([lin.bias for lin in linears]), requires_grad=False)
    return fused


class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, hidden, bias=config.o_proj_bias)
        self.scale = self.head_dim**-0.5
        self.window = config.layer_windows[layer_idx] if config.layer_windows else None
        if config.qk_norm:
            self.q_norm = LlamaRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = LlamaRMSNorm(self.head_dim, config.rms_norm_eps)
        if config.fused_checkpoint:
            self.fuse()

    def fuse(self) -> None:
        """One q/k/v projection instead of three (one GEMM per layer); the checkpoint names are gone after."""
        if hasattr(self, "qkv_proj"):
            return
        self.qkv_proj = fuse_linears(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: LayerKV | None = None,
                slots: torch.Tensor | None = None):
        """q, k (rotated) and v of the normalised input: (N, H, D), (N, Hkv, D), (N, Hkv, D), and
        whether k and v were also written to the cache at `slots` (the kernel does both in one pass)."""
        n, heads = x.shape[0], self.n_head + 2 * self.n_kv
        if hasattr(self, "qkv_proj"):
            qkv = self.qkv_proj(x).view(n, heads, self.head_dim)  # (N, H + 2 Hkv, D)
        else:
            qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1).view(n, heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k, v = qkv.split([self.n_head, self.n_kv, self.n_kv], dim=1)
            qkv = torch.cat([self.q_norm(q), self.k_norm(k), v], dim=1)  # (N, H + 2 Hkv, D)
        qkv, stored = ops.rotate(qkv, cos, sin, self.n_head + self.n_kv, kv, slots)  # q and k rotate together
        q, k, v = qkv.split([self.n_head, self.n_kv, self.n_kv], dim=1)
        return q, k, v, stored


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)
        if config.fused_checkpoint:
            self.fuse()

    def fuse(self) -> None:
        """One gate/up projection instead of two."""
        if hasattr(self, "gate_up_proj"):
            return
        self.gate_up_proj = fuse_linears(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):
            return self.down_proj(ops.silu_mul(self.gate_up_proj(x)))  # (N, 2 inner) -> (N, inner)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    # A layer is two stages around the attention over the cache, so that the stages can be compiled
    # (LlamaForCausalLM.compile_stages) while the cache reads stay as they are. The residual stream
    # is carried as (x, delta): each stage adds the previous stage's output as it normalises.
    def attention_inputs(self, x, delta, cos, sin, kv: LayerKV | None = None, slots: torch.Tensor | None = None):
        """x + delta, and q, k, v of its normalised value (see LlamaAttention.project)."""
        norm = self.input_layernorm
        if delta is None:
            h = norm(x)
        else:
            x, h = ops.add_rms_norm(delta, x, norm.weight, norm.eps)
        return (x, *self.self_attn.project(h, cos, sin, kv, slots))

    def attention_outputs(self, x: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + o_proj(attn), the MLP's output to add next)."""
        norm = self.post_attention_layernorm
        x, h = ops.add_rms_norm(self.self_attn.o_proj(attn), x, norm.weight, norm.eps)  # x += o_proj(attn)
        return x, self.mlp(h)

    def forward(self, x, cos, sin, kv: LayerKV | None, meta: AttentionMetadata | None) -> torch.Tensor:
        x, q, k, v, _ = self.attention_inputs(x, None, cos, sin)
        x, delta = self.attention_outputs(x, attend(q, k, v, kv, meta, self.self_attn.scale,
                                                    window=self.self_attn.window))
        return x + delta


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(rope_inv_freq(config))


class _WeightChanges:
    """Counts every event that may swap a model's weight tensors: a module, parameter or buffer set
    anywhere in the process (global registration hooks: a requantized or replaced layer), and any
    Llama model's `.to()` / `.float()` / ... (its `_apply`). `decoder_weights` is rebuilt when it moved."""

    count = 0

    @classmethod
    def bump(cls, *args: Any) -> None:
        cls.count += 1


for _register in (nn_module.register_module_module_registration_hook,
                  nn_module.register_module_parameter_registration_hook,
                  nn_module.register_module_buffer_registration_hook):
    _register(_WeightChanges.bump)


class LlamaForCausalLM(nn.Module):
    """forward(input_ids, positions, kv_caches, attn_meta) -> hidden; compute_logits(hidden) -> logits."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._stages = (LlamaDecoderLayer.attention_inputs, LlamaDecoderLayer.attention_outputs)

    def compile_stages(self) -> LlamaForCausalLM:
        """Compile each layer's two pure stages with torch.compile (one graph serves all layers).

        Fuses the element-wise work (norms, rotary, SwiGLU, residuals); the first call compiles for
        some seconds. Leave it off (the default) for short runs and for exact float32 parity tests.
        """
        self._stages = tuple(torch.compile(stage, dynamic=True) for stage in self._stages)
        return self

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        """(layers, kv heads, head dim): what the runner allocates KV storage for."""
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
        x, cos, sin = self.embed(input_ids, positions)
        attention_inputs, attention_outputs = self._stages
        compiled = attention_inputs is not LlamaDecoderLayer.attention_inputs
        slots = None if compiled or attn_meta is None else attn_meta.slot_mapping
        delta = None
        for i, layer in enumerate(self.model.layers):
            kv = kv_caches[i] if kv_caches else None
            x, q, k, v, stored = attention_inputs(layer, x, delta, cos, sin, None if slots is None else kv, slots)
            attn = attend(q, k, v, kv, attn_meta, layer.self_attn.scale, stored=stored, window=layer.self_attn.window)
            x, delta = attention_outputs(layer, x, attn)
        norm = self.model.norm
        return ops.add_rms_norm(delta, x, norm.weight, norm.eps)[1]

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor):
        """The token embeddings (N, hidden) and the rotary cos, sin (N, D) float32 of these positions."""
        cos, sin = self.model.rotary_emb(positions)
        return self.model.embed_tokens(input_ids), cos, sin

    def _apply(self, fn, *args, **kwargs):  # .to(), .float(), ...: the weight tensors may be new ones
        result = super()._apply(fn, *args, **kwargs)
        _WeightChanges.bump()
        return result

    def decoder_weights(self) -> DecoderWeights | None:
        """The decoder layers as the fused kernel step reads them, or None where it cannot (compiled
        stages, unfused or unpacked projections, q/k norms, sliding windows). The same object until the
        weights may have changed, so that a step checks it at the cost of one comparison."""
        cached = self.__dict__.get("_decoder_weights")
        if cached is not None and cached[0] == (_WeightChanges.count, self._stages):
            return cached[1]
        weights = self._describe_decoder()
        self.__dict__["_decoder_weights"] = ((_WeightChanges.count, self._stages), weights)
        return weights

    def _describe_decoder(self) -> DecoderWeights | None:
        if self._stages[0] is not LlamaDecoderLayer.attention_inputs:
            return None
        if self.config.qk_norm or self.config.layer_windows:  # layers the kernel step cannot express
            return None
        layers = []
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            modules = [getattr(attn, "qkv_proj", None), getattr(attn, "o_proj", None),
                       getattr(mlp, "gate_up_proj", None), getattr(mlp, "down_proj", None)]
            linears = [m.kernel_weights() if hasattr(m, "kernel_weights") else None for m in modules]
            if any(lin is None for lin in linears):
                return None
            layers.append(DecoderLayerWeights(layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                                              *linears))
        c = self.config
        return DecoderWeights(layers, self.model.norm.weight, c.hidden_size, c.intermediate_size,
                              c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps,
                              self.model.layers[0].self_attn.scale)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # (N, hidden) -> (N, vocab) float32
        return ops.to_float32(self.lm_head(hidden))

    def fuse(self) -> LlamaForCausalLM:
        """Fuse q/k/v and gate/up projections for inference (fewer, larger matrix products)."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        return self

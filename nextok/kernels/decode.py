"""A whole decode step of a Llama-family model in one kernel call (`decode_layers` in cpu_kernels.c).

The per-op path calls about ten kernels per layer from Python; at batch 1 the calls cost as much
as a third of the step. `FusedDecoder` hands the kernel every layer's weights once (pointers in
ctypes structures, built when the decoder is made) and then runs the layers with one call per
step. It computes exactly what the per-op path computes, with the same kernels in the same order.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from nextok.kernels import library
from nextok.kernels.ops import _ptr, block_format
from nextok.models.attention import AttentionMetadata, LayerKV


class _Linear(ctypes.Structure):
    _fields_ = [("packed", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("scale", ctypes.c_void_p),
                ("n", ctypes.c_int64), ("format", ctypes.c_int64)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("qkv", _Linear), ("o", _Linear),
                ("gate_up", _Linear), ("down", _Linear), ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p)]


def _linear_spec(module: nn.Module) -> tuple[_Linear, torch.dtype, int] | None:
    """(the structure, the activation dtype, the most rows the kernel serves or None) of a packed layer."""
    packed = getattr(module, "packed", None)
    if packed is None:
        return None
    if packed.dtype == torch.int8:
        return _Linear(packed.data_ptr(), _ptr(module.bias), module.scale_f32.data_ptr(), module.out_features), \
            torch.bfloat16, None
    return (_Linear(packed.data_ptr(), _ptr(module.bias), None, module.out_features, block_format(packed)), module.dtype,
            module.kernel_rows)


class FusedDecoder:
    """Runs a LlamaForCausalLM's decode steps over its paged KV cache in one kernel call each."""

    def __init__(self, model: nn.Module, kv_caches: list[LayerKV], lib: ctypes.CDLL) -> None:
        self.lib = lib
        config = model.config
        self.eps, self.hidden, self.inner = config.rms_norm_eps, config.hidden_size, config.intermediate_size
        self.n_head, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.scale = model.model.layers[0].self_attn.scale
        self.final_norm = model.model.norm.weight
        layers, dtypes, rows = [], set(), []
        for layer, (k_cache, v_cache) in zip(model.model.layers, kv_caches):
            attn, mlp = layer.self_attn, layer.mlp
            specs = [_linear_spec(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            for spec in specs:
                dtypes.add(spec[1])
                rows.append(spec[2])
            dtypes.update({layer.input_layernorm.weight.dtype, layer.post_attention_layernorm.weight.dtype,
                           k_cache.dtype})
            layers.append(_Layer(layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
                                 *(spec[0] for spec in specs), k_cache.data_ptr(), v_cache.data_ptr()))
        (self.dtype,) = dtypes  # ValueError where weights, norms and cache differ in dtype
        limits = [r for r in rows if r is not None]
        self.max_rows = min(limits) if limits else None
        self.layers = (_Layer * len(layers))(*layers)
        self.block_size = kv_caches[0][0].shape[1]

    @staticmethod
    def build(model: nn.Module, kv_caches: list[LayerKV]) -> FusedDecoder | None:
        """A decoder for this model and cache, or None where the kernel does not apply."""
        lib = library()
        config = model.config
        if lib is None or not kv_caches or config.head_dim > 256 or config.head_dim % 2:
            return None
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if not (hasattr(attn, "qkv_proj") and hasattr(mlp, "gate_up_proj")):
                return None
            if any(getattr(m, "packed", None) is None for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)):
                return None
        tensors = [p for p in model.parameters()] + [t for kv in kv_caches for t in kv]
        if any(t.device.type != "cpu" for t in tensors):
            return None
        try:
            decoder = FusedDecoder(model, kv_caches, lib)
        except ValueError:  # mixed dtypes: the per-op path handles them
            return None
        return decoder if decoder.dtype in (torch.float32, torch.bfloat16) else None

    def accepts(self, x: torch.Tensor) -> bool:
        fits = self.max_rows is None or x.shape[0] <= self.max_rows
        return fits and x.dtype == self.dtype and not torch.compiler.is_compiling()

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """x: (B, hidden) token embeddings; returns the final normalised hidden states (B, hidden)."""
        x = x.contiguous()
        cos, sin = cos.contiguous(), sin.contiguous()
        tables = meta.block_tables
        self.lib.decode_layers(
            self.layers, len(self.layers), self.final_norm.data_ptr(), x.data_ptr(), cos.data_ptr(), sin.data_ptr(),
            meta.slot_mapping.data_ptr(), tables.data_ptr(), tables.shape[1], meta.context_lens.data_ptr(), x.shape[0],
            self.hidden, self.inner, self.n_head, self.n_kv, self.head_dim, self.block_size, self.eps, self.scale,
            int(self.dtype == torch.bfloat16), torch.get_num_threads())
        return x

"""A whole step of a Llama-family model in one kernel call (`forward_layers`, csrc/forward.c): the
new tokens of a batch, one per decoding sequence and chunks of prompts being prefilled, mixed.

The per-op path calls about ten kernels per layer from Python; at batch 1 the calls cost as much
as a third of the step. `FusedDecoder` hands the kernel every layer's weights once (pointers in
ctypes structures) and then runs the layers with one call per step. It computes exactly what the
per-op path computes, with the same kernels in the same order.

It knows tensors, not models: a model describes its layers as `DecoderWeights` (llama.py does), and
the engine's runner decides whether a step runs here. A decoder holds every tensor it was built from
(the weights and the caches), so the memory it reads stays valid as long as it lives; the runner
builds a new one when the model describes its weights anew.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from nextok.kernels import call, has
from nextok.kernels.ops import MAX_HEAD_DIM, _ptr, check_attention_inputs
from nextok.kernels.packing import block_format


@dataclass
class LinearWeights:
    """One packed linear layer as the kernels read it (models/linear.py and quantize.py make these)."""

    packed: torch.Tensor
    bias: torch.Tensor | None
    out_features: int
    dtype: torch.dtype  # the activations' dtype
    scale: torch.Tensor | None = None  # int8 weights: one float32 scale per output

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.packed, self.bias, self.scale) if t is not None]


@dataclass
class DecoderLayerWeights:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: LinearWeights
    o: LinearWeights
    gate_up: LinearWeights
    down: LinearWeights

    def tensors(self) -> list[torch.Tensor]:
        linears = (self.qkv, self.o, self.gate_up, self.down)
        return [self.input_norm, self.post_norm, *(t for lin in linears for t in lin.tensors())]


@dataclass
class DecoderWeights:
    """A Llama-family decoder stack: pre-norm layers, fused q/k/v and gate/up, RMSNorm, rotary, SwiGLU."""

    layers: list[DecoderLayerWeights]
    final_norm: torch.Tensor
    hidden: int
    inner: int
    n_head: int
    n_kv: int
    head_dim: int
    eps: float
    scale: float

    def tensors(self) -> list[torch.Tensor]:
        return [self.final_norm, *(t for layer in self.layers for t in layer.tensors())]


class _Linear(ctypes.Structure):
    _fields_ = [("packed", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("scale", ctypes.c_void_p),
                ("n", ctypes.c_int64), ("format", ctypes.c_int64)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("qkv", _Linear), ("o", _Linear),
                ("gate_up", _Linear), ("down", _Linear), ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p)]


def _linear(w: LinearWeights) -> _Linear:
    return _Linear(w.packed.data_ptr(), _ptr(w.bias), _ptr(w.scale), w.out_features,
                   0 if w.scale is not None else block_format(w.packed))


class FusedDecoder:
    """Runs steps of the described decoder over its paged KV cache, one kernel call each."""

    def __init__(self, weights: DecoderWeights, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 dtype: torch.dtype) -> None:
        self.weights, self.dtype = weights, dtype
        self.kv_caches = list(kv_caches)  # held, with the weights: the pointers below stay valid
        self.layers = (_Layer * len(weights.layers))(*(
            _Layer(layer.input_norm.data_ptr(), layer.post_norm.data_ptr(), _linear(layer.qkv), _linear(layer.o),
                   _linear(layer.gate_up), _linear(layer.down), k.data_ptr(), v.data_ptr())
            for layer, (k, v) in zip(weights.layers, kv_caches)))
        self.k_cache = kv_caches[0][0]

    @staticmethod
    def build(weights: DecoderWeights | None, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> FusedDecoder | None:
        """A decoder for these weights and caches, or None where the kernel does not apply."""
        if weights is None or not has("forward_layers") or len(kv_caches) != len(weights.layers):
            return None
        if weights.head_dim > MAX_HEAD_DIM or weights.head_dim % 2:
            return None
        tensors = [*weights.tensors(), *(t for kv in kv_caches for t in kv)]
        if any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
            return None
        linears = [lin for layer in weights.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        dtypes = {lin.dtype for lin in linears} | {t.dtype for kv in kv_caches for t in kv}
        dtypes |= {weights.final_norm.dtype} | {t.dtype for layer in weights.layers
                                               for t in (layer.input_norm, layer.post_norm)}
        if len(dtypes) != 1:  # mixed dtypes: the per-op path handles them
            return None
        (dtype,) = dtypes
        if dtype == torch.bfloat16 and not has("linear_bf16") or dtype not in (torch.float32, torch.bfloat16):
            return None
        return FusedDecoder(weights, kv_caches, dtype)

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                 block_tables: torch.Tensor, query_start: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        """x: (N, hidden) token embeddings; returns the final normalised hidden states (N, hidden).

        Sequence b's tokens are rows query_start[b] .. query_start[b + 1] and its last positions of
        context_lens[b]; slots: each token's flat KV-cache slot.
        """
        w = self.weights
        if x.dtype != self.dtype:
            raise ValueError(f"FusedDecoder: activations of {x.dtype} for a {self.dtype} decoder")
        x = x.contiguous()
        cos, sin = cos.contiguous(), sin.contiguous()
        n, batch = x.shape[0], context_lens.shape[0]
        if not (x.shape == (n, w.hidden) and cos.shape == sin.shape == (n, w.head_dim) and slots.shape == (n,)
                and block_tables.shape[0] == batch and query_start.shape == (batch + 1,) and batch >= 1
                and cos.dtype == sin.dtype == torch.float32
                and slots.dtype == block_tables.dtype == context_lens.dtype == query_start.dtype == torch.int64
                and all(t.is_contiguous() for t in (block_tables, slots, context_lens, query_start))):
            raise ValueError("FusedDecoder: the step's tensors do not fit the decoder")
        check_attention_inputs(block_tables, query_start, context_lens, self.k_cache, n)
        capacity = self.k_cache.shape[0] * self.k_cache.shape[1]
        if n and not (0 <= int(slots.min()) and int(slots.max()) < capacity):
            raise ValueError("FusedDecoder: a slot lies outside the KV cache")
        call("forward_layers", self.layers, len(self.layers), w.final_norm.data_ptr(), x.data_ptr(), cos.data_ptr(),
             sin.data_ptr(), slots.data_ptr(), block_tables.data_ptr(), block_tables.shape[1], query_start.data_ptr(),
             context_lens.data_ptr(), n, batch, w.hidden, w.inner, w.n_head, w.n_kv, w.head_dim,
             self.k_cache.shape[1], w.eps, w.scale, int(self.dtype == torch.bfloat16), torch.get_num_threads())
        return x

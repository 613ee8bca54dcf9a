"""A whole decode step of a Llama-family model in one kernel call (`decode_layers`, csrc/decode.c).

The per-op path calls about ten kernels per layer from Python; at batch 1 the calls cost as much
as a third of the step. `FusedDecoder` hands the kernel every layer's weights once (pointers in
ctypes structures) and then runs the layers with one call per step. It computes exactly what the
per-op path computes, with the same kernels in the same order.

It knows tensors, not models: a model describes its layers as `DecoderWeights` (llama.py does), and
the engine's runner decides whether a step runs here. A decoder is tied to the tensors it was built
from: `key` names them all, and the runner builds a new one when any of them changed.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from nextok.kernels import call, has
from nextok.kernels.ops import MAX_HEAD_DIM, _check_tables, _ptr
from nextok.kernels.packing import block_format


@dataclass
class LinearWeights:
    """One packed linear layer as the kernels read it (models/linear.py and quantize.py make these)."""

    packed: torch.Tensor
    bias: torch.Tensor | None
    out_features: int
    dtype: torch.dtype  # the activations' dtype
    scale: torch.Tensor | None = None  # int8 weights: one float32 scale per output
    max_rows: int | None = None  # the most rows the kernel serves for this layer (None: any)

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


def fused_key(weights: DecoderWeights, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple:
    """Names every tensor a decoder reads, by address, shape and dtype (a freed tensor's address may be reused)."""
    tensors = [*weights.tensors(), *(t for kv in kv_caches for t in kv)]
    return tuple((t.data_ptr(), t.shape, t.dtype) for t in tensors)


class FusedDecoder:
    """Runs decode steps of the described decoder over its paged KV cache, one kernel call each."""

    def __init__(self, weights: DecoderWeights, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 dtype: torch.dtype) -> None:
        self.weights, self.dtype = weights, dtype
        self.key = fused_key(weights, kv_caches)
        limits = [lin.max_rows for layer in weights.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)
                  if lin.max_rows is not None]
        self.max_rows = min(limits) if limits else None
        self.layers = (_Layer * len(weights.layers))(*(
            _Layer(layer.input_norm.data_ptr(), layer.post_norm.data_ptr(), _linear(layer.qkv), _linear(layer.o),
                   _linear(layer.gate_up), _linear(layer.down), k.data_ptr(), v.data_ptr())
            for layer, (k, v) in zip(weights.layers, kv_caches)))
        self.k_cache = kv_caches[0][0]

    @staticmethod
    def build(weights: DecoderWeights | None, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> FusedDecoder | None:
        """A decoder for these weights and caches, or None where the kernel does not apply."""
        if weights is None or not has("decode_layers") or len(kv_caches) != len(weights.layers):
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

    def accepts_rows(self, rows: int) -> bool:
        return (self.max_rows is None or rows <= self.max_rows) and not torch.compiler.is_compiling()

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        """x: (B, hidden) token embeddings; returns the final normalised hidden states (B, hidden)."""
        w = self.weights
        if x.dtype != self.dtype:
            raise ValueError(f"FusedDecoder: activations of {x.dtype} for a {self.dtype} decoder")
        x = x.contiguous()
        cos, sin = cos.contiguous(), sin.contiguous()
        batch = x.shape[0]
        if not (x.shape == (batch, w.hidden) and cos.shape == sin.shape == (batch, w.head_dim)
                and slots.shape == context_lens.shape == (batch,) and block_tables.shape[0] == batch
                and cos.dtype == sin.dtype == torch.float32
                and slots.dtype == block_tables.dtype == context_lens.dtype == torch.int64
                and block_tables.is_contiguous() and slots.is_contiguous() and context_lens.is_contiguous()):
            raise ValueError("FusedDecoder: the step's tensors do not fit the decoder")
        _check_tables(block_tables, context_lens, self.k_cache)
        capacity = self.k_cache.shape[0] * self.k_cache.shape[1]
        if batch and not (0 <= int(slots.min()) and int(slots.max()) < capacity):
            raise ValueError("FusedDecoder: a slot lies outside the KV cache")
        call("decode_layers", self.layers, len(self.layers), w.final_norm.data_ptr(), x.data_ptr(), cos.data_ptr(),
             sin.data_ptr(), slots.data_ptr(), block_tables.data_ptr(), block_tables.shape[1], context_lens.data_ptr(),
             batch, w.hidden, w.inner, w.n_head, w.n_kv, w.head_dim, self.k_cache.shape[1], w.eps, w.scale,
             int(self.dtype == torch.bfloat16), torch.get_num_threads())
        return x

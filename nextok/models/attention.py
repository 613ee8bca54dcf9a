"""Attention over a paged KV cache, shared by every model family.

The KV storage of one layer is a pair of tensors shaped (num_blocks, block_size, n_kv_heads,
head_dim). Which slots a forward pass writes and which blocks it reads is described by an
`AttentionMetadata`, built by the engine's runner; the model only passes it down.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nextok.kernels import ops

LayerKV = tuple[torch.Tensor, torch.Tensor]  # (k_cache, v_cache), each (num_blocks, block_size, n_kv, head_dim)


@dataclass
class AttentionMetadata:
    """How the N packed tokens of one forward pass map onto sequences and KV-cache slots.

    Prefill: the tokens are the whole contexts of several sequences, packed one after another
    (`prefill_lens` gives each length); attention is causal within each sequence.
    Decode: one new token per sequence; it attends to its sequence's cached context, read through
    `block_tables` (B, max_blocks) up to `context_lens` (B,) tokens (the new token included).
    """

    slot_mapping: torch.Tensor | None  # (N,) flat cache slot (block * block_size + offset) per token
    prefill_lens: list[int] | None = None
    block_tables: torch.Tensor | None = None  # (B, max_blocks) int64
    context_lens: torch.Tensor | None = None  # (B,) int64
    decode_mask: torch.Tensor | None = None  # (B, 1, 1, max_blocks * block_size) bool, built once per step
    # where a layer needs it (the PyTorch decode path; the kernel reads context_lens)

    @property
    def is_prefill(self) -> bool:
        return self.block_tables is None

    @staticmethod
    def single_sequence() -> AttentionMetadata:
        """Plain causal attention over the whole input, no cache (reference forward, tests)."""
        return AttentionMetadata(slot_mapping=None, prefill_lens=None)

    def build_decode_mask(self, block_size: int) -> None:
        assert self.block_tables is not None and self.context_lens is not None
        span = self.block_tables.shape[1] * block_size
        positions = torch.arange(span, device=self.block_tables.device)
        self.decode_mask = (positions[None, :] < self.context_lens[:, None])[:, None, None, :]


def attend(
    q: torch.Tensor,  # (N, n_head, head_dim)
    k: torch.Tensor,  # (N, n_kv, head_dim)
    v: torch.Tensor,  # (N, n_kv, head_dim)
    kv: LayerKV | None,
    meta: AttentionMetadata | None,
    scale: float,
    stored: bool = False,  # k and v are already in the cache at meta.slot_mapping
) -> torch.Tensor:  # (N, n_head * head_dim)
    n_tokens, n_head, head_dim = q.shape
    gqa = n_head != k.shape[1]
    if kv is not None and meta is not None and meta.slot_mapping is not None and not stored:
        k_cache, v_cache = kv
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))

    if meta is None or meta.is_prefill:
        lens = meta.prefill_lens if meta is not None and meta.prefill_lens else [n_tokens]
        outs = []
        for qs, ks, vs in zip(q.split(lens), k.split(lens), v.split(lens)):
            o = F.scaled_dot_product_attention(
                qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1),  # (H, T, D)
                is_causal=True, scale=scale, enable_gqa=gqa,
            )
            outs.append(o.transpose(0, 1))  # (T, H, D)
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out.reshape(n_tokens, n_head * head_dim)

    k_cache, v_cache = kv  # type: ignore[misc]
    bt = meta.block_tables
    out = ops.decode_attention(q, k_cache, v_cache, bt, meta.context_lens, scale)  # reads the blocks in place
    if out is not None:
        return out
    # Without the kernel: gather each sequence's blocks into a padded (B, n_kv, L, D) view and mask the tail.
    if meta.decode_mask is None:  # built by the first layer, shared by the rest
        meta.build_decode_mask(k_cache.shape[1])
    batch = bt.shape[0]
    keys = k_cache[bt].flatten(1, 2).transpose(1, 2)  # (B, n_kv, L, D)
    values = v_cache[bt].flatten(1, 2).transpose(1, 2)  # (B, n_kv, L, D)
    out = F.scaled_dot_product_attention(
        q.view(batch, n_head, 1, head_dim).to(keys.dtype), keys, values,
        attn_mask=meta.decode_mask, scale=scale, enable_gqa=gqa,
    )  # (B, n_head, 1, D)
    return out.reshape(batch, n_head * head_dim).to(q.dtype)

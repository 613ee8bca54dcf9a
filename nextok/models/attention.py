"""Attention over a paged KV cache, shared by every model family.

The C kernel computes plain causal attention; a layer's sliding window (where a context runs past it)
and attention-logit soft-capping (Gemma 2) take the PyTorch path, which computes them the way
transformers' eager attention does.

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

    Each of B sequences contributes its newest tokens: one when decoding, a chunk of its prompt when
    prefilling (both may mix in one pass). Sequence b's tokens are rows query_start[b] ..
    query_start[b + 1] and its last positions of context_lens[b]; the token at position p attends to
    positions 0..p of its sequence (p - window + 1 .. p in a sliding-window layer), read from the cache
    through block_tables (B, max_blocks). Without block tables (`single_sequence`), the tokens are one whole sequence and no cache is used.
    """

    slot_mapping: torch.Tensor | None  # (N,) flat cache slot (block * block_size + offset) per token
    query_start: torch.Tensor | None = None  # (B + 1,) int64
    context_lens: torch.Tensor | None = None  # (B,) int64
    block_tables: torch.Tensor | None = None  # (B, max_blocks) int64
    query_lens: list[int] | None = None  # the same as query_start, for the PyTorch path
    decode_mask: torch.Tensor | None = None  # (B, 1, 1, max_blocks * block_size) bool, built once per step
    # where a layer needs it (the PyTorch decode path; the kernel reads context_lens)

    @property
    def is_decode(self) -> bool:
        """Every sequence adds one token (a decode step)."""
        return self.query_lens is not None and all(n == 1 for n in self.query_lens)

    @staticmethod
    def paged(block_tables: list[list[int]], query_lens: list[int], context_lens: list[int], block_size: int,
              device: torch.device | str = "cpu") -> AttentionMetadata:
        """The metadata of sequences whose last query_lens[b] of context_lens[b] tokens are computed now,
        their tokens' slots read from their block tables."""
        slots, query_start = [], [0]
        for table, n, length in zip(block_tables, query_lens, context_lens):
            slots += [table[p // block_size] * block_size + p % block_size for p in range(length - n, length)]
            query_start.append(query_start[-1] + n)
        width = max(len(t) for t in block_tables)
        tables = [t + [0] * (width - len(t)) for t in block_tables]

        def tensor(values):
            return torch.tensor(values, dtype=torch.int64, device=device)

        return AttentionMetadata(slot_mapping=tensor(slots), query_start=tensor(query_start),
                                 context_lens=tensor(context_lens), block_tables=tensor(tables),
                                 query_lens=list(query_lens))

    @staticmethod
    def single_sequence() -> AttentionMetadata:
        """Plain causal attention over the whole input, no cache (reference forward, tests)."""
        return AttentionMetadata(slot_mapping=None)

    def build_decode_mask(self, block_size: int) -> None:
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
    window: int | None = None,  # sliding window: the token at position p sees positions p - window + 1 .. p
    softcap: float | None = None,  # attention logits become softcap * tanh(logits / softcap) (Gemma 2)
) -> torch.Tensor:  # (N, n_head * head_dim)
    n_tokens, n_head, head_dim = q.shape
    if kv is None or meta is None or meta.block_tables is None:  # one whole sequence, no cache
        qt, kt, vt = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (H, T, D)
        if window is None and softcap is None:
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=n_head != k.shape[1])
        else:
            positions = torch.arange(n_tokens, device=q.device)
            o = _attention(qt, kt, vt, _visible(positions, positions, window), scale, softcap)
        return o.transpose(0, 1).reshape(n_tokens, n_head * head_dim)
    k_cache, v_cache = kv
    if not stored:
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
    if window is not None and int(meta.context_lens.max()) <= window:
        window = None  # no context reaches past the window: plain causal attention
    if window is None and softcap is None:  # what the kernel computes
        out = ops.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start, meta.context_lens, scale)
        if out is not None:
            return out
    if meta.is_decode:
        return _decode_torch(q, k_cache, v_cache, meta, scale, window, softcap)
    return _paged_torch(q, k_cache, v_cache, meta, scale, window, softcap)


def _visible(queries: torch.Tensor, keys: torch.Tensor, window: int | None) -> torch.Tensor:
    """(Q, L) bool: which key positions each query position attends to (causal, within the window)."""
    mask = keys[None, :] <= queries[:, None]
    if window is not None:
        mask &= keys[None, :] > queries[:, None] - window
    return mask


def _attention(q, k, v, mask: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """Softmax attention of q (..., H, T, D) over k, v (..., Hkv, L, D) where mask (..., T, L) is true."""
    gqa = q.shape[-3] != k.shape[-3]
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    if gqa:  # transformers' eager attention: the kv heads repeated for their query heads
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (..., H, T, L)
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype), v)


def _decode_torch(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int | None = None,
                  softcap: float | None = None) -> torch.Tensor:
    """Without the kernel, one token per sequence: gather each sequence's blocks into a padded
    (B, n_kv, L, D) view and mask the tail (and what lies before the window)."""
    if meta.decode_mask is None:  # built by the first layer, shared by the rest
        meta.build_decode_mask(k_cache.shape[1])
    bt = meta.block_tables
    batch, n_head, head_dim = q.shape
    keys = k_cache[bt].flatten(1, 2).transpose(1, 2)  # (B, n_kv, L, D)
    values = v_cache[bt].flatten(1, 2).transpose(1, 2)  # (B, n_kv, L, D)
    mask = meta.decode_mask  # (B, 1, 1, L)
    if window is not None:
        positions = torch.arange(mask.shape[-1], device=mask.device)
        mask = mask & (positions[None, :] >= meta.context_lens[:, None] - window)[:, None, None, :]
    out = _attention(q.view(batch, n_head, 1, head_dim).to(keys.dtype), keys, values, mask, scale, softcap)
    return out.reshape(batch, n_head * head_dim).to(q.dtype)  # (B, n_head, 1, D) -> (B, n_head * D)


def _paged_torch(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int | None = None,
                 softcap: float | None = None) -> torch.Tensor:
    """Without the kernel, any mix of chunks: per sequence, its context gathered from the cache and a
    causal mask offset by the positions already there."""
    n_tokens, n_head, head_dim = q.shape
    block_size = k_cache.shape[1]
    outs = []
    starts = [0]
    for n in meta.query_lens:
        starts.append(starts[-1] + n)
    for b, n in enumerate(meta.query_lens):
        length = int(meta.context_lens[b])
        blocks = meta.block_tables[b, : -(-length // block_size)]
        keys = k_cache[blocks].flatten(0, 1)[:length].transpose(0, 1)  # (n_kv, L, D)
        values = v_cache[blocks].flatten(0, 1)[:length].transpose(0, 1)
        positions = torch.arange(length - n, length, device=q.device)
        mask = _visible(positions, torch.arange(length, device=q.device), window)  # (n, L)
        o = _attention(q[starts[b]:starts[b + 1]].transpose(0, 1).to(keys.dtype), keys, values, mask, scale, softcap)
        outs.append(o.transpose(0, 1).to(q.dtype))  # (n, H, D)
    return torch.cat(outs).reshape(n_tokens, n_head * head_dim)

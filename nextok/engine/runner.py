"""Runs the model on a scheduled batch: owns the KV storage, builds the batch tensors, and decides how a
step runs (the fused kernel step where it applies, else the model's per-op forward)."""

from __future__ import annotations

import torch
from torch import nn

from nextok.engine.scheduler import ScheduledBatch
from nextok.kernels.fused import FusedDecoder
from nextok.models.attention import AttentionMetadata, LayerKV


class ModelRunner:
    """Turns a ScheduledBatch into one forward pass and returns the next-token logits of the sequences
    that complete this step (`ScheduledBatch.completes`), in batch order."""

    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, kv_dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.model = model
        self.block_size = block_size
        self.device = torch.device(device)
        layers, n_kv, head_dim = model.kv_shape
        # One tensor (keys and values, layers, blocks, ...), so a copy on write is one op for all layers.
        self.kv_storage = torch.zeros((2, layers, num_blocks, block_size, n_kv, head_dim), dtype=kv_dtype,
                                      device=self.device)
        self.kv_caches: list[LayerKV] = [(self.kv_storage[0, i], self.kv_storage[1, i]) for i in range(layers)]
        self._fused: tuple | None = None  # (the weights and caches it was built for, the decoder)

    @staticmethod
    def bytes_per_block(model: nn.Module, block_size: int, kv_dtype: torch.dtype) -> int:
        layers, n_kv, head_dim = model.kv_shape
        return 2 * layers * block_size * n_kv * head_dim * torch.finfo(kv_dtype).bits // 8

    @torch.inference_mode()
    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy on write: each (source, destination) block, every layer's keys and values."""
        if copies:
            src = torch.tensor([s for s, _ in copies], device=self.device)
            dst = torch.tensor([d for _, d in copies], device=self.device)
            self.kv_storage[:, :, dst] = self.kv_storage[:, :, src]

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> torch.Tensor:  # (sequences completing, V) float32
        input_ids, positions, meta, logit_rows = self._prepare(batch)
        fused = self.fused_decoder()
        if fused is not None and not torch.compiler.is_compiling():
            x, cos, sin = self.model.embed(input_ids, positions)
            hidden = fused(x, cos, sin, meta.slot_mapping, meta.block_tables, meta.query_start, meta.context_lens)
        else:
            hidden = self.model(input_ids, positions, self.kv_caches, meta)  # (N, hidden)
        if len(logit_rows) != hidden.shape[0]:
            hidden = hidden[torch.tensor(logit_rows, dtype=torch.long, device=hidden.device)]  # (R, hidden)
        return self.model.compute_logits(hidden)

    def fused_decoder(self) -> FusedDecoder | None:
        """The one-call step for this model and cache where the kernels run it, rebuilt when the model
        describes its weights anew (moved or requantized after the engine was made) or the cache changed.
        The decoder holds every tensor it reads, so it never reads freed memory."""
        describe = getattr(self.model, "decoder_weights", None)
        weights = describe() if describe is not None else None
        if weights is None:
            return None
        cached = self._fused
        if cached is None or cached[0] is not weights or cached[1] is not self.kv_caches:
            cached = self._fused = (weights, self.kv_caches, FusedDecoder.build(weights, self.kv_caches))
        return cached[2]

    def _prepare(self, batch: ScheduledBatch):
        """The packed tokens of the step, their positions, the attention metadata (slots included), and
        the rows whose logits are wanted."""
        ids: list[int] = []
        positions: list[int] = []
        context_lens: list[int] = []
        logit_rows: list[int] = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            ids += seq.token_ids[start:start + n]
            positions += range(start, start + n)
            context_lens.append(start + n)
            if batch.completes(i):
                logit_rows.append(len(ids) - 1)
        meta = AttentionMetadata.paged([s.block_table for s in batch.seqs], batch.num_new_tokens, context_lens,
                                       self.block_size, self.device)
        return self._tensor(ids), self._tensor(positions), meta, logit_rows

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

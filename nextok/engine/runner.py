"""Runs the model on a scheduled batch: owns the KV storage, builds the batch tensors."""

from __future__ import annotations

import torch
from torch import nn

from nextok.engine.scheduler import ScheduledBatch
from nextok.kernels.fused import FusedDecoder, fused_key
from nextok.models.attention import AttentionMetadata, LayerKV


class ModelRunner:
    """Turns a ScheduledBatch into one forward pass and returns next-token logits, one row per sequence."""

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
        self._fused: FusedDecoder | None = None

    @staticmethod
    def bytes_per_block(model: nn.Module, block_size: int, kv_dtype: torch.dtype) -> int:
        layers, n_kv, head_dim = model.kv_shape
        return 2 * layers * block_size * n_kv * head_dim * torch.finfo(kv_dtype).bits // 8

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> torch.Tensor:  # (B, V) float32
        if batch.block_copies:
            self._copy_blocks(batch.block_copies)
        input_ids, positions, meta, last_rows = (
            self._prepare_prefill(batch) if batch.is_prefill else self._prepare_decode(batch)
        )
        fused = None if batch.is_prefill else self.fused_decoder()
        if fused is not None and fused.accepts_rows(len(batch.seqs)):
            x, cos, sin = self.model.embed(input_ids, positions)
            hidden = fused(x, cos, sin, meta.slot_mapping, meta.block_tables, meta.context_lens)  # (B, hidden)
        else:
            hidden = self.model(input_ids, positions, self.kv_caches, meta)  # (N, hidden)
        if last_rows is not None:
            hidden = hidden[last_rows]  # (B, hidden)
        return self.model.compute_logits(hidden)

    def fused_decoder(self) -> FusedDecoder | None:
        """The one-call decode step for this model and cache where the kernels run it (rebuilt when any
        tensor it reads changed: a model moved or requantized after the engine was made)."""
        describe = getattr(self.model, "decoder_weights", None)
        weights = describe() if describe is not None else None
        if weights is None:
            return None
        if self._fused is None or self._fused.key != fused_key(weights, self.kv_caches):
            self._fused = FusedDecoder.build(weights, self.kv_caches)
        return self._fused

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        self.kv_storage[:, :, dst] = self.kv_storage[:, :, src]

    def _slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]

    def _prepare_prefill(self, batch: ScheduledBatch):
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        lens: list[int] = []
        for seq in batch.seqs:
            n = len(seq.token_ids)
            ids += seq.token_ids
            positions += range(n)
            slots += self._slots(seq.block_table, 0, n)
            lens.append(n)
        last_rows = torch.tensor(lens).cumsum(0) - 1
        meta = AttentionMetadata(slot_mapping=self._tensor(slots), prefill_lens=lens)
        return self._tensor(ids), self._tensor(positions), meta, last_rows.to(self.device)

    def _prepare_decode(self, batch: ScheduledBatch):
        seqs = batch.seqs
        bs = self.block_size
        ids = [s.token_ids[-1] for s in seqs]
        positions = [len(s.token_ids) - 1 for s in seqs]
        slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, positions)]
        width = max(len(s.block_table) for s in seqs)
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots),
            block_tables=self._tensor(tables),
            context_lens=self._tensor([p + 1 for p in positions]),
        )
        return self._tensor(ids), self._tensor(positions), meta, None

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

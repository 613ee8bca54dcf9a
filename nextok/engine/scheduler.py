"""Which sequences run in the next forward pass: prefill new work, else decode everything running.

Requests are admitted whole (all their sequences together: beams must step together) while the
KV budget and the batch limits allow; new requests join between decode steps (continuous
batching). When blocks run out during decode, the newest request is preempted: its blocks are
freed and its sequences are recomputed by a later prefill, so nothing is lost or wrong.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from nextok.engine.kv_cache import BlockManager
from nextok.engine.sequence import Request, Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    is_prefill: bool
    seqs: list[Sequence]
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (source, destination) blocks


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int = 256, max_num_batched_tokens: int = 4096) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        batch = self._schedule_prefill()
        if batch is None and self.running:
            batch = self._schedule_decode()
        return batch

    # ------------------------------------------------------------------ prefill
    def _schedule_prefill(self) -> ScheduledBatch | None:
        seqs: list[Sequence] = []
        num_tokens = 0
        num_running = sum(len(r.seqs) for r in self.running)
        free = self.blocks.num_free
        while self.waiting:
            request = self.waiting[0]
            pending = [s for s in request.seqs if s.status is SequenceStatus.WAITING]
            tokens = sum(len(s) for s in pending)
            needed = sum(self.blocks.blocks_for(len(s)) for s in pending)
            # Keep a block per running sequence in hand so admitting work does not force preemption.
            reserve = num_running + len(pending)
            fits_tokens = not seqs or num_tokens + tokens <= self.max_num_batched_tokens
            if not fits_tokens or needed + reserve > free and (seqs or self.running):
                break
            if needed > free:  # nothing runs and it still does not fit: it never will
                raise MemoryError(f"a request needs {needed} KV blocks but the cache has {free} free in all")
            if num_running + len(request.seqs) + request.num_samples > self.max_num_seqs and self.running:
                break
            self.waiting.popleft()
            for s in pending:
                s.block_table = self.blocks.allocate(len(s))
                s.status = SequenceStatus.RUNNING
            free -= needed
            seqs += pending
            num_tokens += tokens
            num_running += len(request.seqs)
            self.running.append(request)
        return ScheduledBatch(is_prefill=True, seqs=seqs) if seqs else None

    # ------------------------------------------------------------------ decode
    def _schedule_decode(self) -> ScheduledBatch:
        while True:
            needed = sum(self.blocks.slots_needed(s.block_table, len(s)) for r in self.running for s in r.seqs)
            if needed <= self.blocks.num_free or len(self.running) == 1:
                break
            self._preempt(self.running.pop())
        copies = []
        seqs = []
        for request in self.running:
            for s in request.seqs:
                copy = self.blocks.prepare_write(s.block_table, len(s))
                if copy is not None:
                    copies.append(copy)
                seqs.append(s)
        return ScheduledBatch(is_prefill=False, seqs=seqs, block_copies=copies)

    def _preempt(self, request: Request) -> None:
        for s in request.seqs:
            self.blocks.free(s.block_table)
            s.status = SequenceStatus.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    # ------------------------------------------------------------------ bookkeeping
    def free_sequence(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)

    def finish_request(self, request: Request) -> None:
        for s in request.seqs:
            self.blocks.free(s.block_table)
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)

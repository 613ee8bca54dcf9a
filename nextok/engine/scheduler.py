"""Which tokens run in the next forward pass: every running sequence's next token, and chunks of the
prompts being prefilled, within a token budget (chunked prefill, continuous batching).

Requests are admitted whole (all their sequences together: beams must step together) while the KV
budget and the sequence limit allow; an admitted request holds the KV blocks of all its tokens and
computes its prompt in chunks of up to `max_num_batched_tokens` tokens, mixed with the decode steps
of the running requests, so a long prompt never stalls the others. When another request waits for
its prefill, a prefill takes at most half of the step's budget, so a short request's first token
never waits for a whole long prefill. When blocks run out during decode, the newest request is
preempted: its blocks are freed and its sequences are recomputed later, to the same values.

Scheduling one request can fail (a bug, or a request the cache cannot hold): it then ends alone,
listed in the batch's `failed`, and the others are scheduled as if it had never been there.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from nextok.engine.kv_cache import BlockManager
from nextok.engine.sequence import Request, Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """One forward pass: sequence i computes its next num_new_tokens[i] tokens."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (source, destination) blocks
    failed: list[tuple[Request, Exception]] = field(default_factory=list)  # requests that could not be scheduled

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(n)

    def completes(self, i: int) -> bool:
        """Whether sequence i computes its last token this step (then its logits choose the next one)."""
        return self.seqs[i].num_computed_tokens + self.num_new_tokens[i] == len(self.seqs[i])

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs or self.failed)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int = 256, max_num_batched_tokens: int = 512) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(f"max_num_seqs={max_num_seqs} and max_num_batched_tokens={max_num_batched_tokens} "
                             "must be 1 or more")
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: the newest last
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        batch = ScheduledBatch()
        self._make_room_for_decodes()
        budget = self.max_num_batched_tokens
        candidates = sum(r.is_prefilling for r in self.running) + len(self.waiting)  # requests wanting a prefill
        for request in list(self.running):
            try:
                if request.is_prefilling:
                    budget -= self._schedule_chunk(request, batch, budget, contended=candidates > 1)
                else:
                    budget -= self._schedule_decode(request, batch)
            except Exception as e:  # this request alone ends; the batch goes on without it
                self._fail(request, e, batch)
        while self.waiting and budget > 0 and self._can_admit(self.waiting[0]):
            request = self.waiting.popleft()
            try:
                self._admit(request)
                budget -= self._schedule_chunk(request, batch, budget, contended=candidates > 1)
            except Exception as e:
                self._fail(request, e, batch)
        return batch if batch else None

    # ------------------------------------------------------------------ admission and chunks
    def _can_admit(self, request: Request) -> bool:
        running_seqs = sum(len(r.seqs) for r in self.running)
        pending = [s for s in request.seqs if s.status is SequenceStatus.WAITING]
        needed = sum(self.blocks.blocks_for(len(s)) for s in pending)
        # Keep a block per running sequence in hand so admitting work does not force preemption.
        fits = needed + running_seqs + len(pending) <= self.blocks.num_free
        room = running_seqs + max(len(request.seqs), request.num_samples) <= self.max_num_seqs
        return not self.running or (fits and room)

    def _admit(self, request: Request) -> None:
        self.running.append(request)
        for s in request.seqs:
            if s.status is SequenceStatus.WAITING:
                s.block_table = self.blocks.allocate(len(s))  # MemoryError where it cannot fit at all
                s.num_computed_tokens = 0
                s.status = SequenceStatus.RUNNING

    def _schedule_chunk(self, request: Request, batch: ScheduledBatch, budget: int, contended: bool) -> int:
        """The next chunk of each sequence's tokens, within the budget; returns the tokens scheduled.

        A lone sequence computes up to its last token (whose logits choose the next one); several
        sequences (samples or beams recomputed after preemption) stop one short, so that they all
        take their last token in the same step, as a decode.
        """
        if contended:
            budget = min(budget, max(self.max_num_batched_tokens // 2, 1))
        lone = len(request.seqs) == 1
        used = 0
        for s in request.seqs:
            target = len(s) if lone else len(s) - 1
            n = min(target - s.num_computed_tokens, budget - used)
            if n > 0:
                batch.add(s, n)
                used += n
        return used

    # ------------------------------------------------------------------ decode
    def _decode_blocks_needed(self) -> int:
        return sum(self.blocks.slots_needed(s.block_table, len(s)) for r in self.running if not r.is_prefilling
                   for s in r.seqs)

    def _make_room_for_decodes(self) -> None:
        while len(self.running) > 1 and self._decode_blocks_needed() > self.blocks.num_free:
            self._preempt(self.running.pop())

    def _schedule_decode(self, request: Request, batch: ScheduledBatch) -> int:
        for s in request.seqs:
            copy = self.blocks.prepare_write(s.block_table, len(s))
            if copy is not None:
                batch.block_copies.append(copy)
            batch.add(s, len(s) - s.num_computed_tokens)  # 1
        return len(request.seqs)

    def _preempt(self, request: Request) -> None:
        for s in request.seqs:
            self.blocks.free(s.block_table)
            s.num_computed_tokens = 0
            s.status = SequenceStatus.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    # ------------------------------------------------------------------ bookkeeping
    def _fail(self, request: Request, error: Exception, batch: ScheduledBatch) -> None:
        for i in reversed(range(len(batch.seqs))):  # anything of it already in the batch leaves again
            if batch.seqs[i].request is request:
                del batch.seqs[i], batch.num_new_tokens[i]
        self.finish_request(request)
        batch.failed.append((request, error))

    def free_sequence(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)

    def finish_request(self, request: Request) -> None:
        for s in request.seqs:
            self.blocks.free(s.block_table)
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)

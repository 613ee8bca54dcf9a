"""LLMEngine: requests in, one scheduled forward pass per step, tokens out.

Data flow of a step: scheduler picks the tokens (decodes and prompt chunks) -> runner returns one
logits row per sequence that completes -> token selection (greedy / sampled rows batched, beam groups
per request) -> sequences are extended, stop rules checked, finished sequences give their KV blocks
back.

Fault isolation: whatever fails while scheduling, running or selecting for one request ends that
request alone (finish_reason "error", its message in RequestOutput.error, its blocks freed). Where a
batched forward pass or selection fails and the culprit is unknown, it is retried request by request:
the kernels compute every row the same way whatever else is in the batch, so the others get the
tokens they would have got anyway.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Sequence as Seq

import torch
from torch import nn

from nextok.engine.context import fit_to_context
from nextok.engine.kv_cache import BlockManager
from nextok.engine.results import request_output
from nextok.engine.runner import ModelRunner
from nextok.engine.scheduler import ScheduledBatch, Scheduler
from nextok.engine.sequence import Request, Sequence, SequenceStatus
from nextok.outputs import RequestOutput
from nextok.params import SamplingParams
from nextok.sampling.beam import BeamSearch
from nextok.sampling.selection import select_beam_logprobs, select_tokens
from nextok.sampling.stopping import check_stop, find_stop_string

log = logging.getLogger("nextok.engine")


class LLMEngine:
    """Continuous batching over a paged KV cache. Not thread-safe: one loop drives `step`."""

    def __init__(
        self,
        model: nn.Module,
        eos_token_ids: Seq[int],
        tokenizer=None,
        kv_cache_memory: int | None = None,
        block_size: int = 16,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 512,
        kv_dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if kv_cache_memory is not None and kv_cache_memory < 1:
            raise ValueError(f"kv_cache_memory={kv_cache_memory} is invalid: give a number of bytes above 0, or None")
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self.max_model_len = model.max_positions
        self.vocab_size = model.config.vocab_size
        kv_dtype = kv_dtype or next(model.parameters()).dtype
        if kv_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            kv_dtype = torch.bfloat16
        per_block = ModelRunner.bytes_per_block(model, block_size, kv_dtype)
        budget = kv_cache_memory if kv_cache_memory is not None else default_kv_cache_memory()
        num_blocks = max(1, budget // per_block)
        self.blocks = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        self.runner = ModelRunner(model, num_blocks, block_size, kv_dtype, device)
        self._ids = itertools.count()
        self._random = random.Random()
        self.last_step: tuple[list[Sequence], torch.Tensor] | None = None  # kept where record_logits is set
        self.record_logits = False

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None,
                    request_id: str | None = None, stream: bool = False) -> Request:
        """Queue a request; ValueError (naming the problem) where it can never run."""
        if not prompt_token_ids:
            raise ValueError("the prompt is empty: give at least one token (a model needs a first token)")
        if params.stop and params.num_beams > 1:
            raise ValueError("SamplingParams.stop (stop strings) is not supported with beam search; "
                             "use stop_token_ids instead")
        vocab = self.vocab_size
        if max(prompt_token_ids) >= vocab or min(prompt_token_ids) < 0:
            raise ValueError(f"prompt token ids must lie in [0, {vocab}); got {min(prompt_token_ids)}..{max(prompt_token_ids)}")
        too_big = sorted({t for w in params.bad_words_ids or [] for t in w if t >= vocab})
        if too_big:
            raise ValueError(f"SamplingParams.bad_words_ids holds ids {too_big[:5]} outside the model vocabulary of "
                             f"size {vocab}: use ids below {vocab}.")
        params = fit_to_context(params, len(prompt_token_ids), self.max_model_len)
        eos = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        total = len(prompt_token_ids) + params.max_new_tokens
        worst_case = max(params.num_beams, params.num_return_sequences) * self.blocks.blocks_for(total)
        if worst_case > self.blocks.num_blocks:
            raise ValueError(
                f"this request may need {worst_case} KV blocks but the cache holds {self.blocks.num_blocks}; "
                "lower max_new_tokens or num_beams, or give the engine more kv_cache_memory"
            )
        request = Request(
            request_id=request_id or str(next(self._ids)),
            prompt=prompt,
            prompt_token_ids=list(prompt_token_ids),
            params=params,
            eos_token_ids=frozenset(eos),
            seed=params.seed if params.seed is not None else self._random.getrandbits(31),
            stream=stream,
        )
        if params.num_beams > 1:
            request.beam = BeamSearch(params, num_eos=len(eos))
        request.seqs.append(self._new_sequence(request, list(prompt_token_ids), 0))
        if params.max_new_tokens == 0:
            self._finish(request.seqs[0], "length")
            return request
        self.scheduler.add(request)
        return request

    def abort(self, request: Request) -> None:
        """Cancel a request: its KV blocks are freed at once."""
        request.cancelled = True
        self.scheduler.finish_request(request)
        request.seqs = []

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------ the step
    def step(self) -> list[Request]:
        """Run one forward pass; returns the requests that gained tokens, finished or failed."""
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        touched: dict[int, Request] = {}
        for request, error in batch.failed:
            self.fail(request, error)
            touched[id(request)] = request
        if batch.seqs:
            try:
                self._step(batch, touched)
            except BaseException as e:  # Ctrl-C mid-step: end the step's requests cleanly, then let it through
                for request in {id(s.request): s.request for s in batch.seqs}.values():
                    if not request.is_finished:
                        self.fail(request, e if isinstance(e, Exception) else RuntimeError("interrupted"))
                raise
        return list(touched.values())

    def _step(self, batch: ScheduledBatch, touched: dict[int, Request]) -> None:
        rows = self._forward(batch)  # request -> logits of its sequences that complete, in sequence order
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.request.error is None:
                seq.num_computed_tokens += n
                touched[id(seq.request)] = seq.request
        ready = [r for r in touched.values() if id(r) in rows and r.error is None]
        simple = [r for r in ready if r.beam is None]
        for request in ready:
            if request.beam is not None:
                self._guarded(request, self._beam_step, request, rows[id(request)])
        self._select(simple, rows)
        for request in touched.values():
            if request.is_finished:
                self.scheduler.finish_request(request)

    def _forward(self, batch: ScheduledBatch) -> dict[int, torch.Tensor]:
        """Logits rows per request; a failed pass is retried request by request to find the culprit."""
        self.runner.copy_blocks(batch.block_copies)
        requests = list({id(s.request): s.request for s in batch.seqs}.values())
        try:
            return self._rows(batch, self.runner.run(batch))
        except Exception as e:
            if len(requests) == 1:
                self.fail(requests[0], e)
                return {}
        rows: dict[int, torch.Tensor] = {}
        for request in requests:
            part = ScheduledBatch()
            for seq, n in zip(batch.seqs, batch.num_new_tokens):
                if seq.request is request:
                    part.add(seq, n)
            try:
                rows.update(self._rows(part, self.runner.run(part)))
            except Exception as e:
                self.fail(request, e)
        return rows

    def _rows(self, batch: ScheduledBatch, logits: torch.Tensor) -> dict[int, torch.Tensor]:
        if self.record_logits:
            self.last_step = ([s for i, s in enumerate(batch.seqs) if batch.completes(i)], logits)
        by_request: dict[int, list[int]] = {}
        row = 0
        for i, seq in enumerate(batch.seqs):
            if batch.completes(i):
                by_request.setdefault(id(seq.request), []).append(row)
                row += 1
        if len(by_request) == 1:
            return {key: logits for key in by_request}
        return {key: logits[torch.tensor(index, device=logits.device)] for key, index in by_request.items()}

    def _select(self, requests: list[Request], rows: dict[int, torch.Tensor]) -> None:
        """Greedy and sampled requests: one batched selection; where it fails, one request at a time."""
        if not requests:
            return
        for request in requests:
            if not request.expanded:  # fan the prompt out into its samples; they share its blocks
                self._guarded(request, self._expand, request)
        requests = [r for r in requests if r.error is None]
        try:
            seqs, logits = self._gather(requests, rows)
            selected = select_tokens(seqs, logits)
        except Exception:
            for request in requests:
                self._guarded(request, self._select_one, request, rows)
            return
        start = 0
        for request in requests:
            n = len(request.seqs)
            part = selected.slice(start, start + n)
            start += n
            self._guarded(request, self._append, list(request.seqs), part)

    def _select_one(self, request: Request, rows: dict[int, torch.Tensor]) -> None:
        seqs, logits = self._gather([request], rows)
        self._append(seqs, select_tokens(seqs, logits))

    def _gather(self, requests: list[Request], rows: dict[int, torch.Tensor]) -> tuple[list[Sequence], torch.Tensor]:
        seqs = [s for r in requests for s in r.seqs]
        parts = [rows[id(r)].expand(len(r.seqs), -1) if rows[id(r)].shape[0] != len(r.seqs) else rows[id(r)]
                 for r in requests]  # a prompt's one row serves all its freshly fanned-out samples
        return seqs, parts[0] if len(parts) == 1 else torch.cat(parts)

    def _expand(self, request: Request) -> None:
        request.expanded = True
        parent = request.seqs[0]
        for i in range(1, request.num_samples):
            child = self._new_sequence(request, list(parent.token_ids), i)
            request.seqs.append(child)  # attached before its blocks are shared, so a failure frees them
            child.block_table = self.blocks.fork(parent.block_table)
            child.num_computed_tokens = parent.num_computed_tokens
            child.status = SequenceStatus.RUNNING

    def _guarded(self, request: Request, fn, *args) -> None:
        """fn(*args) for one request; whatever it raises ends that request alone."""
        try:
            fn(*args)
        except Exception as e:
            self.fail(request, e)

    def _append(self, seqs: list[Sequence], selected) -> None:
        for i, seq in enumerate(seqs):
            token = selected.tokens[i]
            seq.token_ids.append(token)
            seq.cumulative_logprob += selected.logprobs[i]
            if seq.logprobs is not None:
                seq.logprobs.append(selected.top_logprobs[i])
            reason = check_stop(seq.params, token, seq.num_output_tokens, len(seq), seq.request.eos_token_ids,
                                self.max_model_len)
            if seq.detokenizer is not None:
                delta = seq.detokenizer.push(token)
                seq.text += delta
                cut = find_stop_string(seq.text, len(delta), seq.params.stop)
                if cut is not None:
                    seq.text = seq.text[:cut]
                    reason = "stop"
                elif reason is not None:
                    seq.text += seq.detokenizer.flush()
            if reason is not None:
                self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        seq.status = SequenceStatus.FINISHED
        self.scheduler.free_sequence(seq)
        request = seq.request
        request.seqs.remove(seq)
        request.finished_seqs.append(seq)

    def fail(self, request: Request, error: Exception) -> None:
        """End one request with an error: finish_reason "error", its blocks freed; the others go on."""
        if request.error is not None:
            return
        internal = not isinstance(error, ValueError)
        if internal:
            log.warning("request %s failed alone", request.request_id, exc_info=error)
        request.error = str(error) if not internal else f"{type(error).__name__}: {error}"
        request.error_type = "server_error" if internal else "invalid_request_error"
        for seq in list(request.seqs):
            self._finish(seq, "error")
        self.scheduler.finish_request(request)

    def _beam_step(self, request: Request, logits: torch.Tensor) -> None:
        beam = request.beam
        live = request.seqs
        logprobs = select_beam_logprobs(live, logits, len(request.eos_token_ids))
        candidates = beam.step(logprobs, [s.output_token_ids for s in live], request.eos_token_ids, request.seed)
        request.expanded = True
        new_seqs = [self._new_sequence(request, live[c.parent].token_ids + [c.token], c.parent) for c in candidates]
        request.seqs = live + new_seqs  # attached before their blocks are shared, so a failure frees them
        for c, child in zip(candidates, new_seqs):
            parent = live[c.parent]
            child.block_table = self.blocks.fork(parent.block_table)
            child.num_computed_tokens = parent.num_computed_tokens
            child.status = SequenceStatus.RUNNING
            child.cumulative_logprob = c.score
        for seq in live:
            self.scheduler.free_sequence(seq)
        request.seqs = new_seqs

    def _new_sequence(self, request: Request, tokens: list[int], sample_index: int) -> Sequence:
        seq = Sequence(request=request, token_ids=tokens, sample_index=sample_index)
        if request.params.logprobs is not None:
            seq.logprobs = []
        if self.tokenizer is not None and request.beam is None and (request.params.stop or request.stream):
            seq.detokenizer = self.tokenizer.detokenizer()
        return seq

    # ------------------------------------------------------------------ results
    def output(self, request: Request) -> RequestOutput:
        """The request's completions so far; best first for beam search, in sample order otherwise."""
        return request_output(request, self.tokenizer)


def default_kv_cache_memory() -> int:
    """A quarter of the memory available now, at most 2 GiB and at least 256 MiB."""
    available = 2 << 30
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return int(min(max(available // 4, 256 << 20), 2 << 30))

"""LLMEngine: requests in, one scheduled forward pass per step, tokens out.

Data flow of a step: scheduler picks a batch -> runner returns one logits row per sequence ->
token selection (greedy / sampled rows batched, beam groups per request) -> sequences are
extended, stop rules checked, finished sequences give their KV blocks back.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence as Seq

import torch
from torch import nn

from nextok.engine.kv_cache import BlockManager
from nextok.engine.runner import ModelRunner
from nextok.engine.scheduler import Scheduler
from nextok.engine.sequence import Request, Sequence, SequenceStatus
from nextok.sampling.selection import SelectedTokens, select_beam_logprobs, select_tokens
from nextok.outputs import Completion, RequestOutput
from nextok.params import SamplingParams
from nextok.sampling.beam import BeamSearch
from nextok.sampling.stopping import check_stop, find_stop_string


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
        max_num_batched_tokens: int = 4096,
        kv_dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self.max_model_len = model.max_positions
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

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        request_id: str | None = None,
        stream: bool = False,
    ) -> Request:
        if not prompt_token_ids:
            raise ValueError("the prompt is empty: give at least one token (a model needs a first token)")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_token_ids)} tokens but the model's context holds "
                f"{self.max_model_len}; shorten the prompt"
            )
        if params.stop and params.num_beams > 1:
            raise ValueError("SamplingParams.stop (stop strings) is not supported with beam search; "
                             "use stop_token_ids instead")
        vocab = self.model.config.vocab_size
        if max(prompt_token_ids) >= vocab or min(prompt_token_ids) < 0:
            raise ValueError(f"prompt token ids must lie in [0, {vocab}); got {min(prompt_token_ids)}..{max(prompt_token_ids)}")
        eos = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        total = min(len(prompt_token_ids) + params.max_new_tokens, self.max_model_len)
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
            request.seqs[0].finish_reason = "length"
            request.finished_seqs, request.seqs = request.seqs, []
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
        """Run one forward pass; returns the requests that gained tokens or finished."""
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        logits = self.runner.run(batch)  # (B, V)
        by_request: dict[int, list[int]] = {}
        for row, seq in enumerate(batch.seqs):
            by_request.setdefault(id(seq.request), []).append(row)
        touched = [batch.seqs[rows[0]].request for rows in by_request.values()]

        simple_rows, simple_seqs = [], []
        for request in touched:
            rows = by_request[id(request)]
            if request.beam is not None:
                self._beam_step(request, logits[rows])
                continue
            if not request.expanded:  # fan the prompt out into its samples; they share its blocks
                request.expanded = True
                parent = request.seqs[0]
                for i in range(1, request.num_samples):
                    child = self._new_sequence(request, list(parent.token_ids), i)
                    child.block_table = self.blocks.fork(parent.block_table)
                    child.status = SequenceStatus.RUNNING
                    request.seqs.append(child)
                rows = rows * request.num_samples
            simple_rows += rows
            simple_seqs += request.seqs
        if simple_seqs:
            same_rows = simple_rows == list(range(logits.shape[0]))
            rows = logits if same_rows else logits[torch.tensor(simple_rows)]  # (len(simple_seqs), V)
            self._append(simple_seqs, select_tokens(simple_seqs, rows))
        for request in touched:
            if request.is_finished:
                self.scheduler.finish_request(request)
        return touched

    def _append(self, seqs: list[Sequence], selected: SelectedTokens) -> None:
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

    def _beam_step(self, request: Request, logits: torch.Tensor) -> None:
        beam = request.beam
        live = request.seqs
        logprobs = select_beam_logprobs(live, logits, len(request.eos_token_ids))
        candidates = beam.step(logprobs, [s.output_token_ids for s in live], request.eos_token_ids, request.seed)
        request.expanded = True
        new_seqs = []
        for c in candidates:
            parent = live[c.parent]
            child = self._new_sequence(request, parent.token_ids + [c.token], c.parent)
            child.block_table = self.blocks.fork(parent.block_table)
            child.status = SequenceStatus.RUNNING
            child.cumulative_logprob = c.score
            new_seqs.append(child)
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
        completions = []
        if request.beam is not None:
            if request.beam.done:
                for i, (tokens, score) in enumerate(request.beam.results()):
                    completions.append(self._completion(i, tokens, "stop" if tokens and tokens[-1] in
                                                        request.eos_token_ids else "length", score, None, None))
        else:
            seqs = sorted(request.finished_seqs + request.seqs, key=lambda s: s.sample_index)
            for s in seqs:
                text = s.text if s.detokenizer is not None else None
                completions.append(self._completion(s.sample_index, s.output_token_ids, s.finish_reason,
                                                    s.cumulative_logprob, s.logprobs, text))
        return RequestOutput(request_id=request.request_id, prompt=request.prompt,
                             prompt_token_ids=request.prompt_token_ids, outputs=completions,
                             finished=request.is_finished)

    def _completion(self, index, tokens, reason, score, logprobs, text) -> Completion:
        if text is None:
            text = self.tokenizer.decode(tokens) if self.tokenizer is not None else ""
        return Completion(index=index, text=text, token_ids=list(tokens), finish_reason=reason, score=score,
                          logprobs=logprobs)


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

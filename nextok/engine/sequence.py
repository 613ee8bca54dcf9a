"""A request and the sequences (samples or beams) it generates."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nextok.params import SamplingParams

if TYPE_CHECKING:
    from nextok.sampling.beam import BeamSearch
    from nextok.tokenizer import IncrementalDetokenizer

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # holds no KV blocks: new, or preempted and to be recomputed
    RUNNING = "running"  # holds the blocks of all its tokens; computes them in chunks, then one a step
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One line of generated tokens with its KV blocks.

    token_ids holds the prompt and everything generated; the KV of its first num_computed_tokens
    tokens is in the cache. A running sequence computes the rest in chunks (a prompt's prefill, or a
    recompute after preemption) and then one token a step: the last one, whose logits choose the next.
    """

    request: Request
    token_ids: list[int]
    sample_index: int = 0  # which of the request's samples: its random stream
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, float]] | None = None
    text: str = ""  # decoded output so far, kept only when stop strings or streaming need it
    detokenizer: IncrementalDetokenizer | None = None
    seq_id: int = field(default_factory=lambda: next(_seq_ids))

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass(eq=False)
class Request:
    """A prompt with its SamplingParams; owns its live sequences and, for beam search, its beam state."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int]  # ids that end a sequence: the model's EOS and stop_token_ids
    seed: int
    stream: bool = False
    seqs: list[Sequence] = field(default_factory=list)  # live (not finished) sequences
    finished_seqs: list[Sequence] = field(default_factory=list)
    beam: BeamSearch | None = None
    expanded: bool = False  # whether the first step has fanned the prompt out into its samples / beams
    cancelled: bool = False
    error: str | None = None  # why the request failed alone (its sequences then end with "error")
    error_type: str | None = None  # "invalid_request_error" (its parameters caused it) or "server_error"

    @property
    def num_samples(self) -> int:
        return 1 if self.params.num_beams > 1 else self.params.num_return_sequences

    @property
    def is_finished(self) -> bool:
        return not self.seqs

    @property
    def is_prefilling(self) -> bool:
        """Some live sequence still has tokens to compute before the next one can be chosen."""
        return any(s.num_computed_tokens < len(s) - 1 for s in self.seqs)

"""What generation returns: one RequestOutput per prompt, holding its Completions best first."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Completion:
    """One generated continuation.

    score: for beam search, the length-normalised beam score (transformers' `sequences_scores`);
    otherwise the sum of the chosen tokens' log-probabilities under the model.
    logprobs: when requested, per generated token, {token_id: logprob} of the chosen token and the
    top alternatives (log-softmax of the model's logits).
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (eos, stop token or stop string) or "length"; None while running
    score: float = 0.0
    logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[Completion] = field(default_factory=list)
    finished: bool = False

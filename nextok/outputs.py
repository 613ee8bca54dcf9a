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
    # "stop" (eos, stop token or stop string), "length" (max_new_tokens or the model's context), "error"
    # (the request failed alone: RequestOutput.error says why), "timeout" (a server's time limit); None while running
    finish_reason: str | None
    score: float = 0.0
    logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestOutput:
    """One prompt's result: its completions (best first for beam search, else in sample order).

    error: why the request failed, where it did (its completions then end with finish_reason
    "error"); a failed request never affects the others generated with it.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[Completion] = field(default_factory=list)
    finished: bool = False
    error: str | None = None
    error_type: str | None = None  # "invalid_request_error" (its parameters caused it) or "server_error"

"""A request's state -> what it returns: RequestOutput and its Completions, finished or not."""

from __future__ import annotations

from nextok.engine.sequence import Request
from nextok.outputs import Completion, RequestOutput


def request_output(request: Request, tokenizer) -> RequestOutput:
    """The request's completions so far: best first for beam search, in sample order otherwise.

    A beam search returns its ranked hypotheses once it is done; a failed one returns the beams it was
    running (best first, finish_reason "error").
    """
    completions = []
    if request.beam is not None and request.error is None:
        if request.beam.done:
            for i, (tokens, score) in enumerate(request.beam.results()):
                reason = "stop" if tokens and tokens[-1] in request.eos_token_ids else "length"
                completions.append(_completion(tokenizer, i, tokens, reason, score, None, None))
    elif request.beam is not None:
        beams = sorted(request.finished_seqs, key=lambda s: s.cumulative_logprob, reverse=True)
        for i, s in enumerate(beams[:request.params.num_return_sequences]):
            completions.append(_completion(tokenizer, i, s.output_token_ids, "error", s.cumulative_logprob, None, None))
    else:
        for s in sorted(request.finished_seqs + request.seqs, key=lambda s: s.sample_index):
            text = s.text if s.detokenizer is not None else None
            completions.append(_completion(tokenizer, s.sample_index, s.output_token_ids, s.finish_reason,
                                           s.cumulative_logprob, s.logprobs, text))
    return RequestOutput(request_id=request.request_id, prompt=request.prompt,
                         prompt_token_ids=request.prompt_token_ids, outputs=completions,
                         finished=request.is_finished, error=request.error, error_type=request.error_type)


def partial_output(request: Request, tokenizer, reason: str) -> RequestOutput:
    """What an unfinished request has so far, every unfinished completion ending with `reason`
    (a server's time limit: "timeout"); num_return_sequences completions, some maybe empty."""
    output = request_output(request, tokenizer)
    if request.beam is not None and not output.outputs:  # beams not ranked yet: the live beams, best first
        beams = sorted(request.seqs, key=lambda s: s.cumulative_logprob, reverse=True)
        output.outputs = [_completion(tokenizer, i, s.output_token_ids, reason, s.cumulative_logprob, None, None)
                          for i, s in enumerate(beams[:request.params.num_return_sequences])]
    have = {c.index for c in output.outputs}
    for i in range(request.params.num_return_sequences):
        if i not in have:  # not expanded into its samples yet
            output.outputs.append(Completion(index=i, text="", token_ids=[], finish_reason=reason))
    for c in output.outputs:
        c.finish_reason = c.finish_reason or reason
    output.outputs.sort(key=lambda c: c.index)
    output.finished = True
    return output


def _completion(tokenizer, index: int, tokens: list[int], reason: str | None, score: float, logprobs,
                text: str | None) -> Completion:
    if text is None:
        text = tokenizer.decode(tokens) if tokenizer is not None else ""
    return Completion(index=index, text=text, token_ids=list(tokens), finish_reason=reason, score=score,
                      logprobs=logprobs)


__all__ = ["partial_output", "request_output"]

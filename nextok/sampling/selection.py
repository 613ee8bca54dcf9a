"""Choosing the next token for a batch of rows: penalties, warpers, greedy or sampled, logprobs.

One call handles every greedy and sampled row of a step together; beam rows get their processed
log-probabilities here and are then ranked per request by `BeamSearch`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nextok.kernels.ops import logsumexp, top_k
from nextok.sampling.processors import RowBatch, apply_penalties, apply_warpers, processors_change_argmax
from nextok.sampling.sampler import greedy, mix_seed, sample, sample_among, top_logprobs


TIE_MARGIN = 16  # candidates past the k-th, for tokens tied with it (common in bfloat16 logits)


@dataclass
class SelectedTokens:
    tokens: list[int]
    logprobs: list[float]  # the chosen token's log-probability under the model
    top_logprobs: list[dict[int, float] | None]

    def slice(self, start: int, end: int) -> SelectedTokens:
        return SelectedTokens(self.tokens[start:end], self.logprobs[start:end], self.top_logprobs[start:end])


def row_batch(seqs: list) -> RowBatch:
    return RowBatch(
        params=[s.params for s in seqs],
        token_ids=[s.token_ids for s in seqs],
        num_prompt_tokens=[s.num_prompt_tokens for s in seqs],
        eos_token_ids=[list(s.request.eos_token_ids) for s in seqs],
    )


def select_tokens(seqs: list, logits: torch.Tensor) -> SelectedTokens:
    """Greedy and sampled rows: logits (B, V) -> one token per row."""
    batch = row_batch(seqs)
    scores = logits
    if any(processors_change_argmax(p) for p in batch.params):
        scores = apply_penalties(logits, batch)
    sampled = [i for i, p in enumerate(batch.params) if p.do_sample]
    tokens = greedy(scores) if len(sampled) < len(seqs) else torch.empty(len(seqs), dtype=torch.long, device=logits.device)
    if sampled:
        rows = torch.tensor(sampled)
        seeds = torch.tensor([mix_seed(seqs[i].request.seed, seqs[i].sample_index) for i in sampled])
        counters = torch.tensor([seqs[i].num_output_tokens for i in sampled])
        chosen_sampled = sample_top_k_rows(scores, batch, sampled, seeds, counters)
        if chosen_sampled is None:
            warped = apply_warpers(scores, batch)
            chosen_sampled = sample(warped if len(sampled) == len(seqs) else warped[rows], seeds, counters)
        tokens[rows] = chosen_sampled
    # The chosen token's log-probability under the model: one reduction, no (B, V) log-softmax.
    chosen = logits.gather(1, tokens[:, None])[:, 0] - logsumexp(logits)  # (B,)
    top: list[dict[int, float] | None] = [None] * len(seqs)
    wanted = max((p.logprobs or 0 for p in batch.params if p.logprobs is not None), default=None)
    if wanted is not None:
        alternatives = top_logprobs(torch.log_softmax(logits, dim=-1), tokens, max(wanted, 1))
        ids, values = alternatives.ids.tolist(), alternatives.values.tolist()
        for i, (s, t, lp) in enumerate(zip(seqs, tokens.tolist(), chosen.tolist())):
            if s.params.logprobs is not None:
                k = s.params.logprobs
                top[i] = {t: lp} | {a: v for a, v in zip(ids[i][:k], values[i][:k]) if a != t}
    return SelectedTokens(tokens=tokens.tolist(), logprobs=chosen.tolist(), top_logprobs=top)


def sample_top_k_rows(scores: torch.Tensor, batch: RowBatch, sampled: list[int], seeds: torch.Tensor,
                      counters: torch.Tensor) -> torch.Tensor | None:
    """Sampled rows that all use top_k: the tokens `sample(apply_warpers(scores))` draws, or None.

    Top-k comes right after temperature in transformers' order, and the later warpers (top-p,
    min-p, typical) only remove tokens and never look at -inf ones. So the warpers can run on the
    k best logits of each row instead of the whole vocabulary, and the draw gives each candidate
    the noise of its own column: the same tokens at a fraction of the cost. transformers keeps
    every token tied with the k-th value, so the candidates are the k best and TIE_MARGIN more, and
    those below the k-th value are masked. None (use the full rows) where a row has no top_k, k is
    large, or the ties at the k-th value reach past the margin.
    """
    params = [batch.params[i] for i in sampled]
    vocab = scores.shape[-1]
    ks = [p.top_k for p in params]
    if not all(ks) or max(ks) >= vocab // 8:
        return None
    sub = scores if len(sampled) == len(batch) else scores[torch.tensor(sampled)]  # (R, V)
    values, columns = top_k(sub, min(max(ks) + TIE_MARGIN, vocab))  # (R, k_max + margin)
    kth = values.gather(1, torch.tensor(ks).unsqueeze(1) - 1)  # (R, 1)
    if values.shape[1] < vocab and bool((values[:, -1:] >= kth).any()):  # ties at the k-th run past the margin
        return None
    values = values.masked_fill(values < kth, float("-inf"))
    rows = RowBatch(params=params, token_ids=[batch.token_ids[i] for i in sampled],
                    num_prompt_tokens=[batch.num_prompt_tokens[i] for i in sampled],
                    eos_token_ids=[batch.eos_token_ids[i] for i in sampled])
    return sample_among(apply_warpers(values, rows), columns, seeds, counters)


def select_beam_logprobs(seqs: list, logits: torch.Tensor, num_eos: int) -> torch.Tensor:
    """Beam rows of one request: processed log-probabilities, as transformers' beam search makes them."""
    batch = row_batch(seqs)
    logprobs = torch.log_softmax(logits, dim=-1)  # (B, V)
    logprobs = apply_penalties(logprobs, batch)
    if batch.params[0].do_sample:
        logprobs = apply_warpers(logprobs, batch, min_tokens_to_keep=[num_eos + 1 if num_eos else 2] * len(seqs))
    return logprobs

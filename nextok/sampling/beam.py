"""Beam search for one request, step for step as transformers' `_beam_search` does it.

The state is kept per request so that a request's beams give the same result alone or in a batch.
Each step takes the processed log-probabilities of the live beams and returns which parent each
next beam continues with which token; finished hypotheses are kept with their length-normalised
scores (transformers' `sequences_scores`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nextok.kernels.ops import top_k
from nextok.params import SamplingParams
from nextok.sampling.sampler import sample_without_replacement

_NEG = -1.0e9  # transformers' "impossible" score


@dataclass
class BeamCandidate:
    parent: int  # index into the live beams given to `step`
    token: int
    score: float  # accumulated log-probability


@dataclass
class BeamRanking:
    """How one step ranked its candidates (what `nextok explain` shows of a beam search step).

    The beams_to_keep best (parent, token) pairs over all live beams, best first, with their
    accumulated scores and whether each ends its hypothesis (an end token, or the last step); `kept`
    are the ranks that continue as the next running beams, in their new order.
    """

    logprobs: torch.Tensor  # (n_live, V) the processed log-probabilities the step ranked
    running_scores: torch.Tensor  # (num_beams,) the running beams' scores before the step
    parents: list[int]
    tokens: list[int]
    scores: list[float]
    ends: list[bool]
    kept: list[int]


class BeamSearch:
    """Running and finished beams of one request."""

    def __init__(self, params: SamplingParams, num_eos: int) -> None:
        self.params = params
        self.num_beams = nb = params.num_beams
        self.beams_to_keep = max(2, 1 + num_eos) * nb
        self.running_scores = torch.zeros(nb)  # (nb,)
        self.running_scores[1:] = _NEG
        self.finished_scores = torch.full((nb,), _NEG)  # (nb,)
        self.finished_flags = torch.zeros(nb, dtype=torch.bool)  # (nb,)
        self.finished_tokens: list[list[int] | None] = [None] * nb  # generated tokens of each slot
        self.improvement_possible = True
        self.num_generated = 0
        self.done = False
        self._top_mask = torch.arange(self.beams_to_keep) < nb  # (K,)
        self.last_ranking: BeamRanking | None = None

    def step(
        self,
        logprobs: torch.Tensor,  # (n_live, V) processed log-probabilities of the live beams
        beam_tokens: list[list[int]],  # generated tokens of each live beam
        eos_token_ids: frozenset[int],
        seed: int,
    ) -> list[BeamCandidate]:
        """Advance one token; returns the next running beams (empty once the search is done)."""
        nb, vocab = self.num_beams, logprobs.shape[-1]
        given = logprobs
        if logprobs.shape[0] != nb:  # first step: every beam is the prompt, only beam 0 scores
            logprobs = logprobs[:1].expand(nb, vocab)
            beam_tokens = beam_tokens[:1] * nb
        accumulated = (logprobs + self.running_scores[:, None]).reshape(1, -1)  # (1, nb * V)
        if self.params.do_sample:
            seeds = torch.tensor([seed], dtype=torch.int64)
            counters = torch.tensor([self.num_generated], dtype=torch.int64)
            top_idx = sample_without_replacement(accumulated, self.beams_to_keep, seeds, counters)  # (1, K)
            top_lp = accumulated.gather(1, top_idx)[0]  # (K,)
            top_idx = top_idx[0]
        else:
            top_lp, top_idx = top_k_as_torch(accumulated[0], self.beams_to_keep)  # (K,)
        parents = (top_idx // vocab).tolist()
        tokens = (top_idx % vocab).tolist()
        max_reached = self.num_generated + 1 >= self.params.max_new_tokens
        hits = torch.tensor([max_reached or t in eos_token_ids for t in tokens])  # (K,)

        # Next running beams: the best candidates that did not just finish.
        running_lp = top_lp + hits.to(torch.float32) * _NEG
        next_scores, next_idx = torch.topk(running_lp, k=nb)
        self.last_ranking = BeamRanking(given, self.running_scores, parents, tokens, top_lp.tolist(),
                                        hits.tolist(), next_idx.tolist())
        self.running_scores = next_scores

        self._update_finished(top_lp, hits, parents, tokens, beam_tokens)
        self.num_generated += 1
        self._update_early_stop()
        all_full = bool(self.finished_flags.all()) and self.params.early_stopping is True
        self.done = not self.improvement_possible or all_full or bool(hits.all())
        if self.done:
            return []
        return [BeamCandidate(parents[i], tokens[i], s) for i, s in zip(next_idx.tolist(), next_scores.tolist())]

    def _update_finished(self, top_lp, hits, parents, tokens, beam_tokens) -> None:
        just_finished = hits & self._top_mask
        scores = top_lp / ((self.num_generated + 1) ** self.params.length_penalty)
        all_full = bool(self.finished_flags.all()) and self.params.early_stopping is True
        scores += torch.tensor(float(all_full)) * _NEG
        scores += torch.tensor(float(not self.improvement_possible)) * _NEG
        scores += (~just_finished) * _NEG
        merged_scores = torch.cat((self.finished_scores, scores))
        merged_flags = torch.cat((self.finished_flags, just_finished))
        keep = torch.topk(merged_scores, k=self.num_beams)[1]
        merged_tokens = self.finished_tokens + [
            beam_tokens[p] + [t] if f else None for p, t, f in zip(parents, tokens, just_finished.tolist())
        ]
        self.finished_scores = merged_scores[keep]
        self.finished_flags = merged_flags[keep]
        self.finished_tokens = [merged_tokens[i] for i in keep.tolist()]

    def _update_early_stop(self) -> None:
        p = self.params
        if p.early_stopping == "never" and p.length_penalty > 0.0:
            best_length = p.max_new_tokens
        else:
            best_length = self.num_generated
        best_running = self.running_scores[:1] / (best_length**p.length_penalty)
        worst_finished = torch.where(self.finished_flags, self.finished_scores.min(), _NEG)
        self.improvement_possible &= bool(torch.any(best_running > worst_finished))

    def results(self) -> list[tuple[list[int], float]]:
        """Finished hypotheses, best first: (generated tokens, sequences_score)."""
        out = []
        for tokens, score, flag in zip(self.finished_tokens, self.finished_scores.tolist(), self.finished_flags.tolist()):
            if flag and tokens is not None:
                out.append((tokens, score))
        return out[: self.params.num_return_sequences]


def top_k_as_torch(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, k) of a 1-D tensor, as transformers ranks beam candidates with it.

    The kernel (ops.top_k, one pass over the nb * V candidates) is used where its answer cannot
    differ: the k best values and the next one are all distinct. Where any of them tie, the order
    of the tied candidates is torch.topk's own, so it ranks them.
    """
    if k + 1 > x.numel():
        return torch.topk(x, k)
    values, indices = top_k(x[None], k + 1)
    values = values[0]
    if bool((values[:-1] > values[1:]).all()):
        return values[:k], indices[0, :k]
    return torch.topk(x, k)

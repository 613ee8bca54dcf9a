"""Batched logits processors with the exact semantics of transformers' logits processors.

Each processor is a small class built from one step's `RowBatch` by ``from_batch``, which returns
``None`` when no row uses it, so unused processors cost nothing. A call handles every row's own
parameter (temperature 0.7 on one row, 1.3 on another), vectorised over rows where the operation
allows it. Rows a processor does not apply to come back bit-for-bit unchanged.

Order (as transformers' ``_get_logits_processor``): repetition penalty, no-repeat n-gram, bad
words, min-new-tokens, then the OpenAI presence/frequency penalty; and, for sampling rows only,
temperature, top-k, top-p, min-p, typical-p.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from nextok.params import SamplingParams

_NEG_INF = float("-inf")


@dataclass
class RowBatch:
    """One step's rows (a row = one sequence or one beam) as the processors see them."""

    params: list[SamplingParams]
    token_ids: list[list[int]]  # per row: prompt + generated so far (unpadded)
    num_prompt_tokens: list[int]
    eos_token_ids: list[list[int]]  # per row: ids that end generation
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.params)

    def token_tensor(self, device: torch.device | str, generated_only: bool = False) -> torch.Tensor:
        """Right-padded token ids, (B, L) int64, padded with -1; built once per batch and device."""
        key = (str(device), generated_only)
        if key not in self._cache:
            rows = [t[p:] if generated_only else t for t, p in zip(self.token_ids, self.num_prompt_tokens)]
            width = max((len(r) for r in rows), default=0)
            padded = torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long)  # (B, L)
            self._cache[key] = padded.reshape(len(rows), width).to(device)
        return self._cache[key]


def processors_change_argmax(params: SamplingParams) -> bool:
    """Whether any penalty processor applies to a row with these params (greedy rows skip work)."""
    return (
        params.repetition_penalty != 1.0
        or params.no_repeat_ngram_size > 0
        or bool(params.bad_words_ids)
        or params.min_new_tokens > 0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
    )


def _vocab_ids(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Map padding (-1) and ids outside the logits to a spare column `vocab_size`."""
    return torch.where((tokens < 0) | (tokens >= vocab_size), vocab_size, tokens)


def _row_tensor(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype).to(like.device).unsqueeze(1)  # (R, 1)


def _ban(sub: torch.Tensor, rows: list[int], ids: list[int]) -> torch.Tensor:
    """Set sub[rows[j], ids[j]] to -inf for every j."""
    if not rows:
        return sub
    banned = torch.zeros_like(sub, dtype=torch.bool)  # (R, V)
    banned[torch.tensor(rows, device=sub.device), torch.tensor(ids, device=sub.device)] = True
    return sub.masked_fill(banned, _NEG_INF)


class _RowSubset:
    """Base for processors that touch only some rows: runs `_process` on those rows only."""

    changes_argmax: ClassVar[bool] = True

    def __init__(self, batch: RowBatch, rows: list[int]):
        self.batch = batch
        self.rows = rows  # indices of the rows this processor applies to
        self.all_rows = len(rows) == len(batch)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        if self.all_rows:
            return self._process(scores)
        index = torch.tensor(self.rows, device=scores.device)  # (R,)
        out = scores.clone()
        out[index] = self._process(scores[index])
        return out

    def _tokens(self, device: torch.device, generated_only: bool = False) -> torch.Tensor:
        tokens = self.batch.token_tensor(device, generated_only)  # (B, L)
        return tokens if self.all_rows else tokens[torch.tensor(self.rows, device=device)]  # (R, L)

    def _process(self, sub: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# ---------------------------------------------------------------------------------- penalties
class RepetitionPenaltyProcessor(_RowSubset):
    """transformers' RepetitionPenaltyLogitsProcessor: a seen token's logit is divided by the
    penalty when positive and multiplied by it when negative (prompt and generated tokens)."""

    @classmethod
    def from_batch(cls, batch: RowBatch) -> RepetitionPenaltyProcessor | None:
        rows = [i for i, p in enumerate(batch.params) if p.repetition_penalty != 1.0]
        return cls(batch, rows) if rows else None

    def _process(self, sub: torch.Tensor) -> torch.Tensor:
        vocab = sub.shape[-1]
        penalty = _row_tensor([self.batch.params[i].repetition_penalty for i in self.rows], sub)  # (R, 1)
        ids = _vocab_ids(self._tokens(sub.device), vocab)  # (R, L)
        padded = torch.nn.functional.pad(sub, (0, 1))  # (R, V + 1), spare column absorbs padding
        seen = padded.gather(1, ids)  # (R, L)
        seen = torch.where(seen < 0, seen * penalty, seen / penalty)
        return padded.scatter(1, ids, seen)[:, :vocab]  # (R, V)


class NoRepeatNGramProcessor(_RowSubset):
    """transformers' NoRepeatNGramLogitsProcessor: bans every token that would complete an n-gram
    already present in the row (prompt included). Rows are grouped by n and matched at once."""

    @classmethod
    def from_batch(cls, batch: RowBatch) -> NoRepeatNGramProcessor | None:
        rows = [i for i, p in enumerate(batch.params)
                if 0 < p.no_repeat_ngram_size <= len(batch.token_ids[i])]
        return cls(batch, rows) if rows else None

    def _process(self, sub: torch.Tensor) -> torch.Tensor:
        vocab, device = sub.shape[-1], sub.device
        tokens = self._tokens(device)  # (R, L), padded with -1
        groups: dict[int, list[int]] = defaultdict(list)
        for r, i in enumerate(self.rows):
            groups[self.batch.params[i].no_repeat_ngram_size].append(r)
        banned = torch.zeros(sub.shape[0], vocab + 1, dtype=torch.bool, device=device)  # (R, V + 1)
        for n, group in groups.items():
            index = torch.tensor(group, device=device)  # (G,)
            rows = tokens[index]  # (G, L)
            lengths = torch.tensor([len(self.batch.token_ids[self.rows[r]]) for r in group], device=device)
            # The last n-1 tokens: an n-gram is completed by the next token only if it starts with them.
            start = (lengths - (n - 1)).unsqueeze(1)  # (G, 1)
            prefix = rows.gather(1, start + torch.arange(n - 1, device=device))  # (G, n-1)
            windows = rows.unfold(1, n, 1)  # (G, L-n+1, n)
            matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)  # (G, L-n+1)
            # A window that runs into the padding ends in -1 and bans only the spare column.
            last = torch.where(matches, _vocab_ids(windows[..., -1], vocab), vocab)  # (G, L-n+1)
            group_mask = torch.zeros(len(group), vocab + 1, dtype=torch.bool, device=device)
            banned[index] = group_mask.scatter(1, last, True)  # (G, V + 1)
        return sub.masked_fill(banned[:, :vocab], _NEG_INF)


class BadWordsProcessor(_RowSubset):
    """transformers' NoBadWordsLogitsProcessor: bans the last token of each bad word whose prefix
    ends the row; single-token bad words equal to an eos id are ignored, as in transformers."""

    @classmethod
    def from_batch(cls, batch: RowBatch) -> BadWordsProcessor | None:
        rows = [i for i, p in enumerate(batch.params) if p.bad_words_ids]
        return cls(batch, rows) if rows else None

    def _process(self, sub: torch.Tensor) -> torch.Tensor:
        vocab = sub.shape[-1]
        ban_rows: list[int] = []
        ban_ids: list[int] = []
        for r, i in enumerate(self.rows):
            eos, tokens = set(self.batch.eos_token_ids[i]), self.batch.token_ids[i]
            words = [w for w in self.batch.params[i].bad_words_ids if not (len(w) == 1 and w[0] in eos)]
            too_big = [t for w in words for t in w if t >= vocab]
            if too_big:
                raise ValueError(f"SamplingParams.bad_words_ids holds ids {too_big} outside the model "
                                 f"vocabulary of size {vocab}: use ids below {vocab}.")
            for w in words:
                prefix = len(w) - 1
                if prefix <= len(tokens) and (prefix == 0 or tokens[len(tokens) - prefix:] == w[:-1]):
                    ban_rows.append(r)
                    ban_ids.append(w[-1])
        return _ban(sub, ban_rows, ban_ids)


class MinNewTokensProcessor(_RowSubset):
    """transformers' MinNewTokensLengthLogitsProcessor: eos ids get -inf until the row has
    generated `min_new_tokens` tokens."""

    @classmethod
    def from_batch(cls, batch: RowBatch) -> MinNewTokensProcessor | None:
        rows = [i for i, p in enumerate(batch.params)
                if batch.eos_token_ids[i]
                and len(batch.token_ids[i]) - batch.num_prompt_tokens[i] < p.min_new_tokens]
        return cls(batch, rows) if rows else None

    def _process(self, sub: torch.Tensor) -> torch.Tensor:
        vocab = sub.shape[-1]
        pairs = [(r, e) for r, i in enumerate(self.rows) for e in self.batch.eos_token_ids[i] if 0 <= e < vocab]
        return _ban(sub, [r for r, _ in pairs], [e for _, e in pairs])


class PresenceFrequencyProcessor(_RowSubset):
    """OpenAI presence/frequency penalties over generated tokens only:
    ``logit -= presence * (count > 0) + frequency * count``."""

    @classmethod
    def from_batch(cls, batch: RowBatch) -> PresenceFrequencyProcessor | None:
        rows = [i for i, p in enumerate(batch.params) if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0]
        return cls(batch, rows) if rows else None

    def _process(self, sub: torch.Tensor) -> torch.Tensor:
        vocab = sub.shape[-1]
        ids = _vocab_ids(self._tokens(sub.device, generated_only=True), vocab)  # (R, L_gen)
        counts = torch.zeros(sub.shape[0], vocab + 1, dtype=sub.dtype, device=sub.device)  # (R, V + 1)
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=sub.dtype))
        counts = counts[:, :vocab]  # (R, V)
        presence = _row_tensor([self.batch.params[i].presence_penalty for i in self.rows], sub)  # (R, 1)
        frequency = _row_tensor([self.batch.params[i].frequency_penalty for i in self.rows], sub)  # (R, 1)
        return sub - (presence * (counts > 0) + frequency * counts)


# ---------------------------------------------------------------------------------- warpers
class _Warper(_RowSubset):
    """A sampling warper: applies to do_sample rows whose parameter turns it on."""

    def __init__(self, batch: RowBatch, rows: list[int], min_tokens_to_keep: list[int]):
        super().__init__(batch, rows)
        self.keep = [min_tokens_to_keep[i] for i in rows]  # per applied row

    @classmethod
    def uses(cls, params: SamplingParams) -> bool:
        raise NotImplementedError

    @classmethod
    def from_batch(cls, batch: RowBatch, min_tokens_to_keep: list[int] | None = None) -> _Warper | None:
        rows = [i for i, p in enumerate(batch.params) if p.do_sample and cls.uses(p)]
        keep = min_tokens_to_keep if min_tokens_to_keep is not None else [1] * len(batch)
        return cls(batch, rows, keep) if rows else None

    def _param(self, name: str, sub: torch.Tensor) -> torch.Tensor:
        return _row_tensor([getattr(self.batch.params[i], name) for i in self.rows], sub)  # (R, 1)


class TemperatureWarper(_Warper):
    """transformers' TemperatureLogitsWarper: logits / temperature, per row."""

    changes_argmax = False

    @classmethod
    def uses(cls, params: SamplingParams) -> bool:
        return params.temperature != 1.0

    def _process(self, sub: torch.Tensor) -> torch.Tensor:
        return sub / self._param("temperature", sub)


class TopKWarper(_Warper):
    """transformers' TopKLogitsWarper: keeps logits >= the k-th largest (ties at the k-th kept),
    with k = max(top_k, min_tokens_to_keep)."""

    changes_argmax = False

    @classmethod
    def uses(cls, params: SamplingParams) -> bool:
        return params.top_k is not None and params.top_k != 0

    def _process(self, sub: torch.Tensor) -> torch.Tensor:
        vocab = sub.shape[-1]
        ks = [min(max(self.batch.params[i].top_k, m), vocab) for i, m in zip(self.rows, self.keep)]
        values = torch.topk(sub, max(ks), dim=-1).values  # (R, k_max), descending
        kth = values.gather(1, torch.tensor(ks, device=sub.device).unsqueeze(1) - 1)  # (R, 1)
        return sub.masked_fill(sub < kth, _NEG_INF)


class TopPWarper(_Warper):
    """transformers' TopPLogitsWarper: removes the least likely tokens whose cumulative
    probability is <= 1 - top_p, keeping at least min_tokens_to_keep."""

    changes_argmax = False

    @classmethod
    def uses(cls, params: SamplingParams) -> bool:
        return params.top_p < 1.0

    def _process(self, sub: torch.Tensor) -> torch.Tensor:
        vocab = sub.shape[-1]
        sorted_logits, sorted_indices = torch.sort(sub, descending=False)  # (R, V) ascending
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (R, V)
        threshold = _row_tensor([1 - self.batch.params[i].top_p for i in self.rows], sub)  # (R, 1)
        remove = cumulative <= threshold  # (R, V)
        first_kept = vocab - torch.tensor(self.keep, device=sub.device).unsqueeze(1)  # (R, 1)
        remove &= torch.arange(vocab, device=sub.device) < first_kept
        remove = remove.scatter(1, sorted_indices, remove)  # back to vocabulary order
        return sub.masked_fill(remove, _NEG_INF)


class MinPWarper(_Warper):
    """transformers' MinPLogitsWarper: removes tokens with probability < min_p * top probability,
    keeping the min_tokens_to_keep most likely."""

    changes_argmax = False

    @classmethod
    def uses(cls, params: SamplingParams) -> bool:
        return params.min_p is not None and params.min_p > 0  # min_p == 0 removes nothing

    def _process(self, sub: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(sub, dim=-1)  # (R, V)
        top = probs.amax(dim=-1, keepdim=True)  # (R, 1)
        remove = probs < self._param("min_p", sub) * top  # (R, V)
        ks = [min(m, sub.shape[-1]) for m in self.keep]
        for k in sorted(set(ks)):  # usually one group; topk per k keeps transformers' tie order
            group = torch.tensor([r for r, kr in enumerate(ks) if kr == k], device=sub.device)  # (G,)
            top_indices = torch.topk(probs[group], k, dim=-1).indices  # (G, k)
            remove[group] = remove[group].scatter(-1, top_indices, False)
        return sub.masked_fill(remove, _NEG_INF)


class TypicalWarper(_Warper):
    """transformers' TypicalLogitsWarper: keeps the tokens whose surprisal is closest to the
    entropy until their mass reaches typical_p."""

    changes_argmax = False

    @classmethod
    def uses(cls, params: SamplingParams) -> bool:
        return params.typical_p < 1.0

    def _process(self, sub: torch.Tensor) -> torch.Tensor:
        vocab = sub.shape[-1]
        normalized = torch.nn.functional.log_softmax(sub, dim=-1)  # (R, V)
        entropy = -(normalized * normalized.exp()).nansum(-1, keepdim=True)  # (R, 1)
        shifted = torch.abs(-normalized - entropy)  # (R, V)
        sorted_scores, sorted_indices = torch.sort(shifted, descending=False)  # (R, V)
        cumulative = sub.gather(-1, sorted_indices).softmax(dim=-1).cumsum(dim=-1)  # (R, V)
        last = (cumulative < self._param("typical_p", sub)).sum(dim=1).clamp(max=vocab - 1)  # (R,)
        remove = sorted_scores > sorted_scores.gather(1, last.unsqueeze(1))  # (R, V)
        keep = torch.tensor(self.keep, device=sub.device).unsqueeze(1)  # (R, 1)
        remove &= torch.arange(vocab, device=sub.device) >= keep
        remove = remove.scatter(1, sorted_indices, remove)
        return sub.masked_fill(remove, _NEG_INF)


PENALTIES = (RepetitionPenaltyProcessor, NoRepeatNGramProcessor, BadWordsProcessor,
             MinNewTokensProcessor, PresenceFrequencyProcessor)
WARPERS = (TemperatureWarper, TopKWarper, TopPWarper, MinPWarper, TypicalWarper)


def apply_penalties(scores: torch.Tensor, batch: RowBatch) -> torch.Tensor:
    """Apply every row's penalties to (B, V) scores in transformers' order; returns new scores."""
    for cls in PENALTIES:
        processor = cls.from_batch(batch)
        if processor is not None:
            scores = processor(scores)
    return scores


def apply_warpers(scores: torch.Tensor, batch: RowBatch, min_tokens_to_keep: list[int] | None = None) -> torch.Tensor:
    """Apply the sampling warpers of do_sample rows to (B, V) scores in transformers' order.

    `min_tokens_to_keep` is per row (transformers uses len(eos) + 1 for beam sampling, else 1).
    Rows with do_sample=False are returned unchanged.
    """
    for cls in WARPERS:
        warper = cls.from_batch(batch, min_tokens_to_keep)
        if warper is not None:
            scores = warper(scores)
    return scores

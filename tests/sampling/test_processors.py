"""Parity of nextok's batched processors with transformers' logits processors, row by row."""

from __future__ import annotations

import functools
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel
from transformers.generation import logits_process as hf

from nextok.params import SamplingParams
from nextok.sampling.processors import (
    BadWordsProcessor, MinNewTokensProcessor, MinPWarper, NoRepeatNGramProcessor, PresenceFrequencyProcessor,
    RepetitionPenaltyProcessor, RowBatch, TemperatureWarper, TopKWarper, TopPWarper, TypicalWarper,
    apply_penalties, apply_warpers, processors_change_argmax,
)

VOCAB = 40
EOS = 7
BATCH_SIZES = (1, 3, 8)
KINDS = ("normal", "ties", "inf", "peaked", "flat")


def make_logits(kind: str, gen: torch.Generator) -> torch.Tensor:
    """One (V,) row of a given shape: exact ties, -inf entries, very peaked or flat."""
    if kind == "ties":
        return torch.randint(-3, 3, (VOCAB,), generator=gen).float()  # many exactly equal logits
    row = torch.randn(VOCAB, generator=gen) * 3
    if kind == "inf":
        row[torch.randperm(VOCAB, generator=gen)[: VOCAB // 2]] = float("-inf")
    elif kind == "peaked":
        row[int(torch.randint(VOCAB, (1,), generator=gen))] = 40.0
    elif kind == "flat":
        row = torch.zeros(VOCAB)
    return row


def make_rows(batch_size: int, offset: int, seed: int = 0) -> tuple[torch.Tensor, list[list[int]], list[int]]:
    """(B, V) logits with mixed kinds, token ids from a small alphabet (many repeats), prompt lengths."""
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    scores = torch.stack([make_logits(KINDS[(b + offset) % len(KINDS)], gen) for b in range(batch_size)])
    tokens = [[rng.randrange(10) for _ in range(rng.randint(1, 14))] for _ in range(batch_size)]
    prompts = [rng.randint(1, len(t)) for t in tokens]
    return scores, tokens, prompts


def batch_of(params: list[SamplingParams], tokens, prompts, eos=None) -> RowBatch:
    return RowBatch(params, tokens, prompts, eos if eos is not None else [[EOS]] * len(params))


def reference(scores: torch.Tensor, tokens: list[list[int]], make) -> torch.Tensor:
    """Apply transformers' processor `make(b)` (None: untouched) to each row on its own."""
    out = scores.clone()
    for b, row in enumerate(tokens):
        proc = make(b)
        if proc is not None:
            out[b : b + 1] = proc(torch.tensor([row]), scores[b : b + 1].clone())
    return out


def assert_same(ours: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)  # -inf must match exactly


grid = pytest.mark.parametrize("batch_size,offset", [(b, o) for b in BATCH_SIZES for o in range(len(KINDS))])


@grid
def test_repetition_penalty(batch_size, offset):
    scores, tokens, prompts = make_rows(batch_size, offset)
    penalties = [(0.5, 1.0, 1.3, 2.0)[(b + offset) % 4] for b in range(batch_size)]
    batch = batch_of([SamplingParams(repetition_penalty=p) for p in penalties], tokens, prompts)
    proc = RepetitionPenaltyProcessor.from_batch(batch)
    ours = proc(scores) if proc is not None else scores
    ref = reference(scores, tokens,
                    lambda b: hf.RepetitionPenaltyLogitsProcessor(penalties[b]) if penalties[b] != 1.0 else None)
    assert_same(ours, ref)


@grid
def test_no_repeat_ngram(batch_size, offset):
    scores, tokens, prompts = make_rows(batch_size, offset)
    sizes = [(1, 2, 3, 4, 0)[(b + offset) % 5] for b in range(batch_size)]
    batch = batch_of([SamplingParams(no_repeat_ngram_size=n) for n in sizes], tokens, prompts)
    proc = NoRepeatNGramProcessor.from_batch(batch)
    ours = proc(scores) if proc is not None else scores
    ref = reference(scores, tokens, lambda b: hf.NoRepeatNGramLogitsProcessor(sizes[b]) if sizes[b] else None)
    assert_same(ours, ref)


BAD_WORDS = ([[3]], [[EOS], [2, 5]], [[1, 2, 9], [4, 4], [EOS, 1]], None, [[0], [1], [8, EOS]])


@grid
def test_bad_words(batch_size, offset):
    scores, tokens, prompts = make_rows(batch_size, offset)
    words = [BAD_WORDS[(b + offset) % len(BAD_WORDS)] for b in range(batch_size)]
    for b, w in enumerate(words):  # make some multi-token prefixes match the end of the row
        if w and b % 2 == 0:
            longest = max(w, key=len)
            tokens[b] = tokens[b] + longest[:-1]
    batch = batch_of([SamplingParams(bad_words_ids=w) for w in words], tokens, prompts)
    proc = BadWordsProcessor.from_batch(batch)
    ours = proc(scores) if proc is not None else scores
    ref = reference(scores, tokens, lambda b: hf.NoBadWordsLogitsProcessor(words[b], EOS) if words[b] else None)
    assert_same(ours, ref)


def test_bad_words_outside_vocab_raises():
    batch = batch_of([SamplingParams(bad_words_ids=[[VOCAB + 3]])], [[1, 2]], [1])
    with pytest.raises(ValueError, match="bad_words_ids"):
        BadWordsProcessor.from_batch(batch)(torch.zeros(1, VOCAB))


@grid
def test_min_new_tokens(batch_size, offset):
    scores, tokens, prompts = make_rows(batch_size, offset)
    minimum = [(0, 1, 3, 20)[(b + offset) % 4] for b in range(batch_size)]
    eos = [[[EOS], [EOS, 2, 11], []][(b + offset) % 3] for b in range(batch_size)]
    batch = batch_of([SamplingParams(min_new_tokens=m) for m in minimum], tokens, prompts, eos)
    proc = MinNewTokensProcessor.from_batch(batch)
    ours = proc(scores) if proc is not None else scores
    ref = reference(scores, tokens, lambda b: hf.MinNewTokensLengthLogitsProcessor(prompts[b], minimum[b], eos[b])
                    if minimum[b] and eos[b] else None)
    assert_same(ours, ref)


def test_presence_frequency_penalty_formula():
    scores, tokens, prompts = make_rows(8, 0, seed=3)
    values = [(0.0, 0.0), (0.5, 0.0), (0.0, 0.7), (-1.0, 2.0), (2.0, -0.3), (0.0, 0.0), (1.0, 1.0), (0.1, 0.1)]
    params = [SamplingParams(presence_penalty=p, frequency_penalty=f) for p, f in values]
    ours = PresenceFrequencyProcessor.from_batch(batch_of(params, tokens, prompts))(scores)
    expected = scores.clone()
    for b, (presence, frequency) in enumerate(values):
        for token in set(tokens[b][prompts[b]:]):  # generated tokens only
            count = tokens[b][prompts[b]:].count(token)
            expected[b, token] -= presence * (count > 0) + frequency * count
    assert_same(ours, expected)


WARPER_CASES = [
    (TemperatureWarper, "temperature", (0.3, 0.7, 1.0, 1.5), lambda v, m: hf.TemperatureLogitsWarper(v)),
    (TopKWarper, "top_k", (1, 5, 0, 39, 100), lambda v, m: hf.TopKLogitsWarper(v, min_tokens_to_keep=m)),
    (TopPWarper, "top_p", (0.1, 0.5, 1.0, 0.9, 0.99), lambda v, m: hf.TopPLogitsWarper(v, min_tokens_to_keep=m)),
    (MinPWarper, "min_p", (0.05, 0.3, 0.0, 1.0, 0.7), lambda v, m: hf.MinPLogitsWarper(v, min_tokens_to_keep=m)),
    (TypicalWarper, "typical_p", (0.2, 0.5, 1.0, 0.95), lambda v, m: hf.TypicalLogitsWarper(v, min_tokens_to_keep=m)),
]


@pytest.mark.parametrize("keep", (1, 3))
@pytest.mark.parametrize("case", WARPER_CASES, ids=[c[1] for c in WARPER_CASES])
@grid
def test_warper(batch_size, offset, case, keep):
    cls, name, values, make_hf = case
    scores, tokens, prompts = make_rows(batch_size, offset, seed=offset)
    row_values = [values[(b + offset) % len(values)] for b in range(batch_size)]
    do_sample = [b % 4 != 3 for b in range(batch_size)]  # some greedy rows stay untouched
    params = [SamplingParams(do_sample=s, **{"top_k": 0, name: v}) for s, v in zip(do_sample, row_values)]
    keeps = [keep if b % 2 == 0 else 1 for b in range(batch_size)]
    warper = cls.from_batch(batch_of(params, tokens, prompts), keeps)
    ours = warper(scores) if warper is not None else scores

    def make(b):
        v = row_values[b]
        turned_off = v == 0 if name in ("top_k", "min_p") else v == 1.0
        return None if not do_sample[b] or turned_off else make_hf(v, keeps[b])

    assert_same(ours, reference(scores, tokens, make))


def test_uniform_batch_matches_one_batched_transformers_call():
    scores, _, _ = make_rows(8, 0)
    tokens = [[1, 2, 3, 1, 2, 4, 1, 2]] * 8
    params = SamplingParams(do_sample=True, temperature=0.7, top_k=10, top_p=0.8, min_p=0.05, typical_p=0.9,
                            repetition_penalty=1.3, no_repeat_ngram_size=2)
    batch = batch_of([params] * 8, tokens, [3] * 8)
    ours = apply_warpers(apply_penalties(scores, batch), batch)
    ids = torch.tensor(tokens)
    ref = hf.LogitsProcessorList([
        hf.RepetitionPenaltyLogitsProcessor(1.3), hf.NoRepeatNGramLogitsProcessor(2),
        hf.TemperatureLogitsWarper(0.7), hf.TopKLogitsWarper(10), hf.TopPLogitsWarper(0.8),
        hf.MinPLogitsWarper(0.05), hf.TypicalLogitsWarper(0.9),
    ])(ids, scores.clone())
    assert_same(ours, ref)


def test_processors_change_argmax():
    assert not processors_change_argmax(SamplingParams())
    assert not processors_change_argmax(SamplingParams(do_sample=True, temperature=0.5, top_p=0.5))
    for change in (dict(repetition_penalty=1.1), dict(no_repeat_ngram_size=2), dict(bad_words_ids=[[1]]),
                   dict(min_new_tokens=1), dict(presence_penalty=0.5), dict(frequency_penalty=0.5)):
        assert processors_change_argmax(SamplingParams(**change))


def test_unused_processors_are_skipped_and_rows_untouched():
    scores, tokens, prompts = make_rows(3, 0)
    batch = batch_of([SamplingParams(), SamplingParams(temperature=0.5)], tokens[:2], prompts[:2])
    for cls in (RepetitionPenaltyProcessor, NoRepeatNGramProcessor, BadWordsProcessor, MinNewTokensProcessor,
                PresenceFrequencyProcessor):
        assert cls.from_batch(batch) is None
    assert TemperatureWarper.from_batch(batch) is None  # greedy rows never warp
    assert torch.equal(apply_warpers(apply_penalties(scores[:2], batch), batch), scores[:2])


# ---------------------------------------------------------------- composition, as generate builds it
@functools.cache
def tiny_model() -> GPT2LMHeadModel:
    """Only its _get_logits_processor is used: the processor list exactly as generate builds it."""
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=1, n_embd=4, n_positions=64, vocab_size=VOCAB,
                                      bos_token_id=0, eos_token_id=EOS))


def transformers_processors(p: SamplingParams, prompt_len: int, eos: list[int]) -> hf.LogitsProcessorList:
    config = GenerationConfig(
        do_sample=p.do_sample, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
        typical_p=p.typical_p, repetition_penalty=p.repetition_penalty, no_repeat_ngram_size=p.no_repeat_ngram_size,
        bad_words_ids=p.bad_words_ids, min_new_tokens=p.min_new_tokens, num_beams=p.num_beams,
    )
    config._eos_token_tensor = torch.tensor(eos) if eos else None
    return tiny_model()._get_logits_processor(
        generation_config=config, input_ids_seq_length=prompt_len, encoder_input_ids=None,
        prefix_allowed_tokens_fn=None, logits_processor=hf.LogitsProcessorList(), device="cpu",
        model_kwargs={"attention_mask": torch.ones(1, prompt_len, dtype=torch.long)},
    )


row_params = st.builds(
    SamplingParams,
    do_sample=st.booleans(),
    temperature=st.sampled_from([0.5, 1.0, 1.7]),
    top_k=st.sampled_from([None, 0, 1, 4, 50]),
    top_p=st.sampled_from([0.3, 0.9, 1.0]),
    min_p=st.sampled_from([None, 0.0, 0.1]),
    typical_p=st.sampled_from([0.5, 1.0]),
    repetition_penalty=st.sampled_from([1.0, 0.8, 1.5]),
    no_repeat_ngram_size=st.sampled_from([0, 1, 2, 3]),
    bad_words_ids=st.sampled_from([None, [[3]], [[1, 2], [5]], [[EOS]], [[2, EOS]]]),
    min_new_tokens=st.sampled_from([0, 2, 6]),
    num_beams=st.sampled_from([1, 1, 3]),
)
row = st.tuples(row_params, st.lists(st.integers(0, 9), min_size=1, max_size=12), st.integers(1, 12),
                st.sampled_from(KINDS), st.sampled_from([[EOS], [EOS, 2], []]))


@settings(max_examples=60, derandomize=True, deadline=None)
@given(rows=st.lists(row, min_size=1, max_size=8), seed=st.integers(0, 2**16))
def test_composition_matches_generate_processor_list(rows, seed):
    gen = torch.Generator().manual_seed(seed)
    params = [r[0] for r in rows]
    tokens = [r[1] for r in rows]
    prompts = [min(r[2], len(r[1])) for r in rows]
    eos = [r[4] for r in rows]
    scores = torch.stack([make_logits(r[3], gen) for r in rows])  # (B, V)
    keeps = [(len(e) + 1 if e else 2) if p.num_beams > 1 else 1 for p, e in zip(params, eos)]
    batch = RowBatch(params, tokens, prompts, eos)
    ours = apply_warpers(apply_penalties(scores, batch), batch, keeps)
    ref = reference(scores, tokens, lambda b: transformers_processors(params[b], prompts[b], eos[b]))
    assert_same(ours, ref)

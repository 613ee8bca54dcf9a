"""The scheduler: chunked prefill within the token budget, decodes first, room for a waiting request."""

from __future__ import annotations

import pytest

from nextok.params import SamplingParams

from ..models.helpers import llama_pair
from .reference import engine_for, random_prompts, run_engine

VOCAB = 320


@pytest.fixture(scope="module")
def model():
    return llama_pair(seed=5, max_position_embeddings=512)[1]


def tokens(results):
    return [[(c.token_ids, c.score) for c in r.outputs] for r in results]


MIX = [SamplingParams(max_new_tokens=12), SamplingParams(max_new_tokens=10, num_beams=3, num_return_sequences=2),
       SamplingParams(max_new_tokens=12, do_sample=True, seed=2, num_return_sequences=2),
       SamplingParams(max_new_tokens=8, repetition_penalty=1.3)]


@pytest.mark.parametrize("budget", [1, 7, 16, 50])
def test_prompts_prefilled_in_chunks_give_the_same_tokens(model, budget):
    """Prompts of 30-200 tokens through a step budget of 1 to 50 tokens: the chunks fall anywhere, and
    every token and score equals a run that prefills each prompt in one pass."""
    prompts = random_prompts(4, VOCAB, seed=budget, low=30, high=200)
    whole = engine_for(model, eos=2, max_num_batched_tokens=4096)
    chunked = engine_for(model, eos=2, max_num_batched_tokens=budget)
    assert tokens(run_engine(chunked, prompts, MIX)) == tokens(run_engine(whole, prompts, MIX))


def test_a_step_holds_decodes_and_prompt_chunks_within_the_budget(model):
    engine = engine_for(model, eos=2, max_num_batched_tokens=32)
    short = engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=20, ignore_eos=True))
    engine.step()  # the short prompt, whole
    long = engine.add_request([10 + i % 300 for i in range(200)], SamplingParams(max_new_tokens=2))
    batch = engine.scheduler.schedule()
    assert batch.num_tokens <= 32
    assert [s.request for s in batch.seqs] == [short, long]  # the running request's decode first
    assert batch.num_new_tokens == [1, 31]


def test_a_waiting_request_gets_its_first_token_during_a_long_prefill(model):
    """While a 400-token prompt is prefilled in chunks, a new 3-token request is prefilled in the very next
    step: the long prefill takes half the budget whenever another request waits for its own."""
    engine = engine_for(model, eos=2, max_num_batched_tokens=64)
    long = engine.add_request([10 + i % 300 for i in range(400)], SamplingParams(max_new_tokens=1))
    engine.step()
    assert long.seqs[0].num_computed_tokens == 64  # alone: the whole budget
    short = engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=1))
    engine.step()
    assert short.is_finished and len(engine.output(short).outputs[0].token_ids) == 1
    assert long.seqs[0].num_computed_tokens == 64 + 32  # half the budget while short waited
    while engine.has_unfinished():
        engine.step()
    assert len(engine.output(long).outputs[0].token_ids) == 1 and engine.blocks.num_used == 0

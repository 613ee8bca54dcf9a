"""The engine: preemption and recompute, sharing, per-request seeds, logprobs, abort."""

from __future__ import annotations

import math

import pytest
import torch

from nextok.engine.runner import ModelRunner
from nextok.params import SamplingParams

from ..models.helpers import llama_pair
from .reference import engine_for, random_prompts, run_engine

VOCAB = 320


@pytest.fixture(scope="module")
def model():
    return llama_pair(seed=5)[1]


def tokens(results):
    return [[c.token_ids for c in r.outputs] for r in results]


MIXED = [
    SamplingParams(max_new_tokens=30),
    SamplingParams(max_new_tokens=25, num_beams=4, num_return_sequences=4),
    SamplingParams(max_new_tokens=30, do_sample=True, seed=1, num_return_sequences=3),
    SamplingParams(max_new_tokens=20, repetition_penalty=1.4),
] * 3


def test_preemption_under_a_tiny_kv_budget_gives_the_same_tokens(model):
    prompts = random_prompts(len(MIXED), VOCAB, seed=3, low=10, high=30)
    roomy = engine_for(model, eos=2)
    expected = tokens(run_engine(roomy, prompts, MIXED))
    # Enough blocks for the largest request alone, far too few for all of them at once.
    per_block = ModelRunner.bytes_per_block(model, 4, torch.float32)
    tight = engine_for(model, eos=2, kv_cache_memory=per_block * 60)
    assert tokens(run_engine(tight, prompts, MIXED)) == expected
    assert tight.scheduler.num_preemptions > 0
    assert roomy.scheduler.num_preemptions == 0


def test_request_larger_than_the_cache_is_refused(model):
    per_block = ModelRunner.bytes_per_block(model, 4, torch.float32)
    engine = engine_for(model, eos=2, kv_cache_memory=per_block * 4)
    with pytest.raises(ValueError, match="KV blocks"):
        engine.add_request([5] * 10, SamplingParams(max_new_tokens=40))


def test_beams_share_the_prompt_blocks(model):
    prompt = random_prompts(1, VOCAB, seed=4, low=40, high=41)[0]
    engine = engine_for(model, eos=2)
    request = engine.add_request(prompt, SamplingParams(max_new_tokens=6, num_beams=6))
    engine.step()  # prefill + first beam step
    engine.step()  # first decode with 6 beams
    prompt_blocks = engine.blocks.blocks_for(len(prompt))
    used = engine.blocks.num_used
    # Unshared, six beams would hold 6 copies of the prompt; shared, only diverging tail blocks are private.
    assert used < 6 * prompt_blocks
    assert used <= prompt_blocks + 6 * 2
    while not request.is_finished:
        engine.step()
    assert engine.blocks.num_used == 0


def test_same_seed_same_tokens_alone_or_among_others(model):
    prompts = random_prompts(9, VOCAB, seed=8)
    target = SamplingParams(max_new_tokens=20, do_sample=True, seed=123, top_p=0.9, temperature=0.8)
    alone = tokens(run_engine(engine_for(model, eos=2), prompts[:1], target))
    again = tokens(run_engine(engine_for(model, eos=2), prompts[:1], target))
    others = [SamplingParams(max_new_tokens=n, do_sample=True, seed=n) for n in range(5, 13)]
    crowd = tokens(run_engine(engine_for(model, eos=2), prompts, [target] + others))
    assert alone == again == crowd[:1]
    other_seed = tokens(run_engine(engine_for(model, eos=2), prompts[:1], target.replace(seed=124)))
    assert other_seed != alone


def test_num_return_sequences_sampling_gives_distinct_samples(model):
    prompt = random_prompts(1, VOCAB, seed=9)[0]
    result = run_engine(engine_for(model, eos=2), [prompt],
                        SamplingParams(max_new_tokens=12, do_sample=True, seed=0, num_return_sequences=4))[0]
    samples = [c.token_ids for c in result.outputs]
    assert len(samples) == 4 and len({tuple(s) for s in samples}) > 1
    assert [c.index for c in result.outputs] == [0, 1, 2, 3]


def test_logprobs_report_the_chosen_token_and_alternatives(model):
    prompt = random_prompts(1, VOCAB, seed=10)[0]
    result = run_engine(engine_for(model, eos=2), [prompt], SamplingParams(max_new_tokens=5, logprobs=3))[0]
    c = result.outputs[0]
    assert len(c.logprobs) == 5
    for token, step in zip(c.token_ids, c.logprobs):
        assert token in step and len(step) == 3  # greedy: the chosen token is the top one
        assert max(step.values()) == step[token]
    assert c.score == pytest.approx(sum(step[t] for t, step in zip(c.token_ids, c.logprobs)), abs=1e-4)
    with torch.inference_mode():
        ids = torch.tensor(prompt)
        first = torch.log_softmax(model.compute_logits(model(ids, torch.arange(len(ids))))[-1], -1)
    assert math.isclose(c.logprobs[0][c.token_ids[0]], first[c.token_ids[0]].item(), abs_tol=1e-4)


def test_stop_token_ids_and_max_new_tokens_reasons(model):
    prompt = random_prompts(1, VOCAB, seed=12)[0]
    free = run_engine(engine_for(model, eos=2), [prompt], SamplingParams(max_new_tokens=8))[0].outputs[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 8
    stop_at = free.token_ids[3]
    stopped = run_engine(engine_for(model, eos=2), [prompt],
                         SamplingParams(max_new_tokens=8, stop_token_ids=[stop_at]))[0].outputs[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[: free.token_ids.index(stop_at) + 1]


def test_abort_frees_blocks_at_once(model):
    engine = engine_for(model, eos=2)
    request = engine.add_request([5, 6, 7, 8, 9], SamplingParams(max_new_tokens=50, num_beams=3))
    for _ in range(4):
        engine.step()
    assert engine.blocks.num_used > 0
    engine.abort(request)
    assert engine.blocks.num_used == 0 and not engine.has_unfinished()


@pytest.mark.parametrize("bad, match", [
    (dict(prompt=[]), "empty"),
    (dict(prompt=[VOCAB + 5]), "token ids"),
    (dict(prompt=[1] * 300), "context"),
])
def test_bad_prompts_are_refused_clearly(model, bad, match):
    engine = engine_for(model, eos=2)
    with pytest.raises(ValueError, match=match):
        engine.add_request(bad["prompt"], SamplingParams())

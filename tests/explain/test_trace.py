"""LLM.trace: its tokens are generate's, and what it records is consistent with them."""

from __future__ import annotations

import json
import math

import pytest

from nextok import SamplingParams
from nextok.explain.trace import Trace

PROMPT = "I enjoy walking with my cute dog"


@pytest.fixture(scope="module")
def stop_ids(tiny_llm) -> list[int]:
    """Two tokens the tiny model ranks high after the prompt's first generated token, used as stop
    tokens so that beams finish before the length limit (a random model never says EOS)."""
    trace = tiny_llm.trace(PROMPT, SamplingParams(max_new_tokens=2))
    return [c.token for c in trace.samples[0].steps[1].candidates[1:3]]


def _generate(llm, params: SamplingParams):
    return llm.generate(PROMPT, params, use_tqdm=False)[0].outputs


def _same_as_generate(llm, params: SamplingParams) -> Trace:
    trace = llm.trace(PROMPT, params)
    expected = _generate(llm, params)
    assert [c.token_ids for c in trace.outputs] == [c.token_ids for c in expected]
    assert [c.finish_reason for c in trace.outputs] == [c.finish_reason for c in expected]
    assert [c.text for c in trace.outputs] == [c.text for c in expected]
    assert [c.score for c in trace.outputs] == pytest.approx([c.score for c in expected], abs=1e-6)
    json.loads(trace.to_json())  # plain, strict JSON
    return trace


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=10),
    SamplingParams(max_new_tokens=8, repetition_penalty=1.5, no_repeat_ngram_size=2),
    SamplingParams(max_new_tokens=8, do_sample=True, top_k=10, seed=7),
    SamplingParams(max_new_tokens=8, do_sample=True, top_k=0, top_p=0.9, seed=3),
    SamplingParams(max_new_tokens=6, do_sample=True, top_p=0.8, temperature=0.7, num_return_sequences=2, seed=11),
], ids=["greedy", "greedy-penalties", "top-k", "top-p", "two-samples"])
def test_token_traces_equal_generate(tiny_llm, params):
    trace = _same_as_generate(tiny_llm, params)
    assert trace.strategy == ("sampling" if params.do_sample else "greedy")
    assert len(trace.samples) == params.num_return_sequences
    for sample, output in zip(trace.samples, trace.outputs):
        assert [s.token for s in sample.steps] == output.token_ids
        for step in sample.steps:
            chosen = next(c for c in step.candidates if c.token == step.token)
            assert chosen.probs[-1] > 0  # a token a cut removed is never chosen
            if not params.do_sample:
                assert step.reason == "argmax" and step.candidates[0].token == step.token


def test_stages_follow_the_params(tiny_llm):
    params = SamplingParams(max_new_tokens=4, do_sample=True, repetition_penalty=1.2, temperature=0.8, top_k=12,
                            top_p=0.9, min_p=0.01, seed=0)
    trace = tiny_llm.trace(PROMPT, params)
    assert trace.stages == ["model", "penalties", "temperature", "top_k", "top_p", "min_p"]
    top_k = trace.stages.index("top_k")
    for step in trace.samples[0].steps:
        assert step.kept[top_k] == 12
        assert step.kept[0] == tiny_llm.config["vocab_size"]
        assert all(a >= b for a, b in zip(step.kept[top_k:], step.kept[top_k + 1:]))  # cuts only remove
        ranked = step.candidates[: trace.top]
        assert all(c.probs[top_k] > 0 for c in ranked[:12]) and all(c.probs[top_k] == 0 for c in ranked[12:])


@pytest.mark.parametrize("top_k", [10, 0])
def test_probabilities_after_the_top_p_cut_sum_to_one(tiny_llm, top_k):
    params = SamplingParams(max_new_tokens=5, do_sample=True, top_k=top_k, top_p=0.6, temperature=0.5, seed=5)
    trace = _same_as_generate(tiny_llm, params)
    stage = trace.stages.index("top_p")
    for step in trace.samples[0].steps:
        shown = math.fsum(c.probs[stage] for c in step.candidates)
        if top_k:  # every kept token is listed
            assert step.kept[stage] <= trace.top
            assert shown == pytest.approx(1.0, abs=1e-6)
        assert shown + step.rest[stage] == pytest.approx(1.0, abs=1e-6)  # the listed ones and the rest


@pytest.mark.parametrize("early_stopping", [True, False])
def test_beam_traces_equal_generate(tiny_llm, stop_ids, early_stopping):
    params = SamplingParams(max_new_tokens=10, num_beams=4, early_stopping=early_stopping, num_return_sequences=4,
                            stop_token_ids=stop_ids)
    trace = _same_as_generate(tiny_llm, params)
    beam = trace.beam
    assert trace.strategy == "beam search" and beam.num_beams == 4 and not trace.samples
    assert any(h.step < len(beam.steps) - 1 for h in beam.hypotheses)  # some beams finished early

    # Every live beam continues a kept candidate of its parent, and each step keeps num_beams.
    for t, step in enumerate(beam.steps):
        assert len(step.beams) == (1 if t == 0 else 4)
        if t + 1 < len(beam.steps):
            kept = [c for node in step.beams for c in node.candidates if c.status == "kept"]
            assert sorted(c.child for c in kept) == [0, 1, 2, 3]
            for b, node in enumerate(beam.steps[t + 1].beams):
                parent = step.beams[node.parent]
                match = [c for c in parent.candidates if c.child == b]
                assert len(match) == 1 and match[0].token == node.token and match[0].score == pytest.approx(node.score)
        ranks = sorted(c.rank for node in step.beams for c in node.candidates if c.rank is not None)
        assert ranks == list(range(beam.beams_to_keep))

    # The final hypotheses are generate's completions, best first, and their paths spell them.
    final = [h for h in beam.hypotheses if h.final]
    assert [h.token_ids for h in final] == [c.token_ids for c in trace.outputs]
    assert [h.score for h in final] == pytest.approx([c.score for c in trace.outputs], abs=1e-6)
    for h in final:
        path = beam.path(h)
        tokens = [beam.steps[s].beams[b].token for s, b in path[1:]] + [h.token]
        assert tokens == h.token_ids and len(path) == len(h.token_ids)


def test_beam_sampling_equals_generate(tiny_llm):
    params = SamplingParams(max_new_tokens=4, num_beams=3, do_sample=True, top_k=20, seed=2)
    trace = _same_as_generate(tiny_llm, params)
    assert trace.strategy == "beam sampling" and trace.stages == ["model", "top_k"]


def test_trace_without_seed_records_the_one_it_used(tiny_llm):
    params = SamplingParams(max_new_tokens=3, do_sample=True)
    trace = tiny_llm.trace(PROMPT, params)
    again = _generate(tiny_llm, params.replace(seed=trace.seed))
    assert trace.token_ids == again[0].token_ids

"""Nothing poisons the engine: a request that fails ends alone, the others give the tokens they give
alone, every KV block comes back, and the engine keeps working (property-tested with hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nextok.engine import engine as engine_module
from nextok.engine.runner import ModelRunner
from nextok.params import SamplingParams
from nextok.sampling import processors

from ..models.helpers import gpt2_pair, llama_pair
from .reference import engine_for, random_prompts

VOCAB, EOS, CONTEXT = 320, 2, 64
POISON_PENALTY = 1.2345  # a repetition_penalty that the injected processor fault recognises


@pytest.fixture(scope="module")
def model():
    return llama_pair(seed=11, max_position_embeddings=CONTEXT)[1]


# ---------------------------------------------------------------------- the request mix
def _params(kind: str, new: int, seed: int, stop: bool) -> SamplingParams:
    common = dict(max_new_tokens=new, seed=seed, stop_token_ids=[7, 9] if stop else [])
    if kind == "greedy":
        return SamplingParams(**common)
    if kind == "beam":
        return SamplingParams(num_beams=3, num_return_sequences=2, length_penalty=0.7, **common)
    if kind == "sample":
        return SamplingParams(do_sample=True, top_k=20, num_return_sequences=2, **common)
    return SamplingParams(repetition_penalty=1.3, no_repeat_ngram_size=2, **common)


requests_strategy = st.lists(
    st.tuples(st.sampled_from(["greedy", "beam", "sample", "penalties"]),  # strategy
              st.integers(1, 40),  # prompt length (up to the context, with what it generates)
              st.integers(1, 40),  # max_new_tokens: some run into the context of 64
              st.integers(0, 3),  # seed
              st.booleans()),  # stop tokens
    min_size=1, max_size=6)


def _tokens(output) -> list:
    return [(c.token_ids, c.finish_reason) for c in output.outputs]


_solo_cache: dict = {}


def _alone(model, prompt: list[int], params: SamplingParams) -> list:
    key = (tuple(prompt), repr(params))
    if key not in _solo_cache:
        engine = engine_for(model, eos=EOS, kv_cache_memory=32 << 20)
        request = engine.add_request(prompt, params)
        while engine.has_unfinished():
            engine.step()
        _solo_cache[key] = _tokens(engine.output(request))
    return _solo_cache[key]


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mix=requests_strategy, fault=st.sampled_from(["none", "model", "processor", "abort"]),
       victim=st.integers(0, 5), tiny_cache=st.booleans(), abort_after=st.integers(0, 6))
def test_random_mixes_with_one_faulted_request(model, monkeypatch, mix, fault, victim, tiny_cache, abort_after):
    prompts = random_prompts(len(mix), VOCAB, seed=len(mix) * 7 + victim)
    prompts = [(p * 10)[:length] for p, (_, length, *_) in zip(prompts, mix)]
    params = [_params(kind, new, seed, stop) for kind, _, new, seed, stop in mix]
    victim %= len(mix)
    if fault == "processor":
        params[victim] = params[victim].replace(repetition_penalty=POISON_PENALTY)
    per_block = ModelRunner.bytes_per_block(model, 4, torch.float32)
    engine = engine_for(model, eos=EOS, kv_cache_memory=per_block * (70 if tiny_cache else 2000))
    requests = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    poisoned = requests[victim]

    real_run = ModelRunner.run

    def failing_run(runner, batch):
        if any(s.request is poisoned for s in batch.seqs):
            raise RuntimeError("injected model fault")
        return real_run(runner, batch)

    real_apply = processors.apply_penalties

    def failing_penalties(scores, batch):
        if any(p.repetition_penalty == POISON_PENALTY for p in batch.params):
            raise RuntimeError("injected processor fault")
        return real_apply(scores, batch)

    if fault == "model":
        monkeypatch.setattr(ModelRunner, "run", failing_run)
    if fault == "processor":
        monkeypatch.setattr(processors, "apply_penalties", failing_penalties)
        monkeypatch.setattr("nextok.sampling.selection.apply_penalties", failing_penalties)
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        if fault == "abort" and steps == abort_after and not poisoned.is_finished:
            engine.abort(poisoned)
    monkeypatch.undo()

    assert engine.blocks.num_used == 0 and engine.blocks.num_free == engine.blocks.num_blocks
    assert not engine.scheduler.running and not engine.scheduler.waiting
    for i, (request, prompt, p) in enumerate(zip(requests, prompts, params)):
        out = engine.output(request)
        if i == victim and fault in ("model", "processor"):
            assert out.error is not None and "injected" in out.error and out.error_type == "server_error"
            assert all(c.finish_reason == "error" for c in out.outputs)
        elif i == victim and fault == "abort":
            continue
        else:
            assert out.error is None
            assert _tokens(out) == _alone(model, prompt, p), (i, mix[i])
    # and the engine keeps working: a fresh request gives its solo tokens
    again = engine.add_request(prompts[0], _params("sample", 5, 0, False))
    while engine.has_unfinished():
        engine.step()
    assert _tokens(engine.output(again)) == _alone(model, prompts[0], again.params)


def test_the_retry_finds_the_culprit_of_a_failed_pass(model, monkeypatch):
    """A batched pass that fails is rerun request by request: only the culprit fails."""
    engine = engine_for(model, eos=EOS)
    prompts = random_prompts(4, VOCAB, seed=2)
    requests = [engine.add_request(p, SamplingParams(max_new_tokens=6)) for p in prompts]
    calls = []
    real_run = ModelRunner.run

    def run(runner, batch):
        calls.append(len({id(s.request) for s in batch.seqs}))
        if any(s.request is requests[2] for s in batch.seqs):
            raise RuntimeError("boom")
        return real_run(runner, batch)

    monkeypatch.setattr(ModelRunner, "run", run)
    while engine.has_unfinished():
        engine.step()
    assert calls[:5] == [4, 1, 1, 1, 1]  # the batch, then each request alone
    outs = [engine.output(r) for r in requests]
    assert outs[2].error == "RuntimeError: boom" and [c.finish_reason for c in outs[2].outputs] == ["error"]
    assert all(o.error is None and o.outputs[0].finish_reason == "length" for i, o in enumerate(outs) if i != 2)
    assert engine.blocks.num_used == 0


def test_a_failure_in_one_beam_search_leaves_the_others(model, monkeypatch):
    engine = engine_for(model, eos=EOS)
    prompts = random_prompts(3, VOCAB, seed=8)
    beams = [engine.add_request(p, SamplingParams(max_new_tokens=8, num_beams=3)) for p in prompts]
    real_step = engine_module.BeamSearch.step

    def step(beam, logprobs, *args):
        if beam is beams[1].beam and beam.num_generated == 2:
            raise ZeroDivisionError("inside the ranking")
        return real_step(beam, logprobs, *args)

    monkeypatch.setattr(engine_module.BeamSearch, "step", step)
    while engine.has_unfinished():
        engine.step()
    outs = [engine.output(r) for r in beams]
    assert outs[1].error is not None and all(c.finish_reason == "error" for c in outs[1].outputs)
    assert len(outs[1].outputs[0].token_ids) == 2  # what the beams held when it failed
    for i in (0, 2):
        assert outs[i].error is None and _tokens(outs[i]) == _alone(model, prompts[i], beams[i].params)
    assert engine.blocks.num_used == 0


# ---------------------------------------------------------------------- the model's context
@pytest.mark.parametrize("pair", [gpt2_pair, llama_pair], ids=["gpt2", "llama"])
@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=40),
    SamplingParams(max_new_tokens=40, num_beams=3, num_return_sequences=2, early_stopping="never"),
    SamplingParams(max_new_tokens=40, do_sample=True, seed=1, num_return_sequences=2),
], ids=["greedy", "beams", "samples"])
def test_every_strategy_stops_at_the_context(pair, params):
    """A 20-token prompt and 40 new tokens in a context of 32 (the GPT-2 case that poisoned the engine)."""
    context = {"n_positions": 32} if pair is gpt2_pair else {"max_position_embeddings": 32}
    model = pair(seed=3, **context)[1]
    engine = engine_for(model, eos=EOS)
    prompt = random_prompts(1, VOCAB, seed=5, low=20, high=21)[0]
    request = engine.add_request(prompt, params.replace(ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    out = engine.output(request)
    assert out.error is None and len(out.outputs) == params.num_return_sequences
    assert all(len(c.token_ids) == 12 and c.finish_reason == "length" for c in out.outputs)
    after = engine.add_request(prompt, SamplingParams(max_new_tokens=3, do_sample=True, seed=2))
    while engine.has_unfinished():
        engine.step()
    assert engine.output(after).outputs[0].finish_reason == "length" and engine.blocks.num_used == 0


def test_a_prompt_that_fills_the_context_is_refused(model):
    engine = engine_for(model, eos=EOS)
    with pytest.raises(ValueError, match="context holds 64"):
        engine.add_request([5] * CONTEXT, SamplingParams(num_beams=2))
    assert not engine.has_unfinished()


def test_bad_words_outside_the_vocabulary_are_refused_when_added(model):
    engine = engine_for(model, eos=EOS)
    with pytest.raises(ValueError, match="bad_words_ids.*999999"):
        engine.add_request([5, 6], SamplingParams(bad_words_ids=[[999999]]))
    assert not engine.has_unfinished()

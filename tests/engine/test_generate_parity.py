"""Token-for-token parity with transformers' generate, through the engine (float32, CPU)."""

from __future__ import annotations

import pytest

from nextok.params import SamplingParams

from ..models.helpers import ARCH_CONFIGS, arch_pair, gpt2_pair, llama_pair
from .reference import engine_for, hf_generate, random_prompts, run_engine

VOCAB = 320


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def models(request):
    return llama_pair(seed=3) if request.param == "llama" else gpt2_pair(seed=4)


def pick_eos(ref, prompt, step: int, **kwargs) -> int:
    """A token the model generates at `step`: used as EOS so that sequences stop early."""
    seqs, _ = hf_generate(ref, prompt, eos=10**6, max_new_tokens=step + 1, **kwargs)
    return seqs[0][step]


def assert_same(ref, ours_model, prompts, eos, **kwargs):
    params = SamplingParams(**kwargs)
    results = run_engine(engine_for(ours_model, eos), prompts, params)
    for prompt, result in zip(prompts, results):
        expected, scores = hf_generate(ref, prompt, eos, **kwargs)
        got = [c.token_ids for c in result.outputs]
        assert got == expected, f"prompt {prompt}: {kwargs}"
        if scores is not None:
            assert [c.score for c in result.outputs] == pytest.approx(scores, abs=1e-4)


def test_greedy(models):
    ref, ours = models
    prompts = random_prompts(3, VOCAB, seed=1)
    assert_same(ref, ours, prompts, eos=2, max_new_tokens=24)


@pytest.mark.parametrize("num_beams", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("early_stopping", [True, False, "never"])
@pytest.mark.parametrize("length_penalty", [-0.5, 0.0, 1.0, 2.0])
def test_beam_search_grid(models, num_beams, early_stopping, length_penalty):
    ref, ours = models
    prompts = random_prompts(2, VOCAB, seed=num_beams)
    # An EOS the best beam meets after a few steps makes finished hypotheses, pruning and early stopping count.
    eos = pick_eos(ref, prompts[0], 3, num_beams=num_beams)
    assert_same(ref, ours, prompts, eos, max_new_tokens=12, num_beams=num_beams, early_stopping=early_stopping,
                length_penalty=length_penalty, num_return_sequences=max(1, num_beams - 1))


@pytest.mark.parametrize("kwargs", [
    dict(no_repeat_ngram_size=2),
    dict(no_repeat_ngram_size=3),
    dict(repetition_penalty=1.3),
    dict(repetition_penalty=1.3, num_beams=3, num_return_sequences=3),
    dict(no_repeat_ngram_size=2, repetition_penalty=1.5, num_beams=5, num_return_sequences=5, early_stopping=True),
    dict(min_new_tokens=6),
    dict(min_new_tokens=6, num_beams=4),
    dict(bad_words_ids=[[7], [11, 12], [100]]),
    dict(bad_words_ids=[[7], [30, 31]], num_beams=3),
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_processors_in_generate(models, kwargs):
    ref, ours = models
    prompts = random_prompts(3, VOCAB, seed=7)
    eos = pick_eos(ref, prompts[0], 2)
    assert_same(ref, ours, prompts, eos, max_new_tokens=16, **kwargs)


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("strategy", [dict(), dict(num_beams=4, num_return_sequences=2)], ids=["greedy", "beam4"])
def test_batches_of_different_lengths_equal_solo(models, batch, strategy):
    """Prompts of different lengths batched together each give what transformers gives for them alone."""
    ref, ours = models
    prompts = random_prompts(batch, VOCAB, seed=batch, low=2, high=40)
    eos = pick_eos(ref, prompts[0], 4)
    assert_same(ref, ours, prompts, eos, max_new_tokens=14, **strategy)


def test_eos_at_first_step(models):
    ref, ours = models
    prompt = random_prompts(1, VOCAB, seed=11)[0]
    eos = pick_eos(ref, prompt, 0)
    result = run_engine(engine_for(ours, eos), [prompt], SamplingParams(max_new_tokens=10))[0]
    assert result.outputs[0].token_ids == [eos]
    assert result.outputs[0].finish_reason == "stop"
    assert_same(ref, ours, [prompt], eos, max_new_tokens=10)


def test_mixed_requests_in_one_batch(models):
    """Greedy, beam and sampled requests with different lengths and stop rules share steps without interfering."""
    ref, ours = models
    prompts = random_prompts(5, VOCAB, seed=21, high=30)
    eos = pick_eos(ref, prompts[1], 5)
    mixed = [
        SamplingParams(max_new_tokens=20),
        SamplingParams(max_new_tokens=9, num_beams=3, num_return_sequences=2),
        SamplingParams(max_new_tokens=15, do_sample=True, seed=5, top_k=20),
        SamplingParams(max_new_tokens=7, repetition_penalty=1.3, num_beams=2, early_stopping=True),
        SamplingParams(max_new_tokens=12, stop_token_ids=[5, 6]),
    ]
    engine = engine_for(ours, eos)
    together = run_engine(engine, prompts, mixed)
    for prompt, params, result in zip(prompts, mixed, together):
        alone = run_engine(engine_for(ours, eos), [prompt], params)[0]
        assert [c.token_ids for c in result.outputs] == [c.token_ids for c in alone.outputs]
        if not params.do_sample and not params.stop_token_ids:
            expected, _ = hf_generate(ref, prompt, eos, **{k: getattr(params, k) for k in
                                      ("max_new_tokens", "num_beams", "num_return_sequences", "repetition_penalty",
                                       "early_stopping")})
            assert [c.token_ids for c in result.outputs] == expected


@pytest.fixture(scope="module", params=list(ARCH_CONFIGS))
def arch_models(request):
    return arch_pair(request.param, seed=6)


@pytest.mark.parametrize("strategy", [dict(), dict(num_beams=3, num_return_sequences=2),
                                      dict(num_beams=4, early_stopping=True, length_penalty=0.5)],
                         ids=["greedy", "beam3", "beam4-early"])
def test_newer_architectures(arch_models, strategy):
    """Qwen3, Phi-3, Gemma 2 / 3 and the sliding-window models: prompts of different lengths batched
    together, and contexts that run past the windows (5 to 7 positions) while they generate."""
    ref, ours = arch_models
    prompts = random_prompts(4, VOCAB, seed=3, low=2, high=24)
    eos = pick_eos(ref, prompts[0], 6, **strategy)
    assert_same(ref, ours, prompts, eos, max_new_tokens=16, **strategy)

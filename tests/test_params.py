"""SamplingParams: defaults as transformers, clear errors, generation_config defaults."""

from __future__ import annotations

import pytest
import transformers

from nextok.params import SamplingParams


def test_defaults_follow_transformers():
    ours = SamplingParams()
    theirs = transformers.GenerationConfig._get_default_generation_params()
    for name in ("do_sample", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
                 "no_repeat_ngram_size", "num_beams", "length_penalty", "early_stopping", "num_return_sequences",
                 "bad_words_ids"):
        assert getattr(ours, name) == theirs[name], name


@pytest.mark.parametrize("kwargs, field, fix", [
    (dict(temperature=-0.5), "temperature", ">= 0"),
    (dict(top_p=0.0), "top_p", "(0, 1]"),
    (dict(top_p=1.5), "top_p", "(0, 1]"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences", "num_beams"),
    (dict(max_new_tokens=-1), "max_new_tokens", ">= 0"),
    (dict(num_return_sequences=2), "num_return_sequences", "do_sample=True"),
    (dict(repetition_penalty=0), "repetition_penalty", "(0, 10000]"),
    (dict(early_stopping="sometimes"), "early_stopping", "never"),
    (dict(top_k=-1), "top_k", "0 or None"),
    (dict(min_new_tokens=30, max_new_tokens=10), "min_new_tokens", "max_new_tokens"),
    (dict(do_sample=True, temperature=0), "temperature", "do_sample=False"),
    (dict(presence_penalty=3), "presence_penalty", "[-2, 2]"),
    (dict(stop=[""]), "stop", "non-empty"),
    (dict(stop=5), "stop", "list of strings"),
    (dict(stop_token_ids=5), "stop_token_ids", "list of token ids"),
    (dict(bad_words_ids=[1, 2]), "bad_words_ids", "list of lists"),
    (dict(bad_words_ids="12"), "bad_words_ids", "list of lists"),
    (dict(length_penalty=100, max_new_tokens=2000, num_beams=2), "length_penalty", "overflows"),
    (dict(length_penalty=-100.0), "length_penalty", "overflows"),
    (dict(do_sample=True, temperature=1e-9), "temperature", "at least"),
    (dict(do_sample=True, temperature=1e30), "temperature", "at most"),
    (dict(repetition_penalty=1e30), "repetition_penalty", "(0, 10000]"),
])
def test_bad_values_name_the_field_value_and_fix(kwargs, field, fix):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    message = str(info.value)
    assert field in message and fix in message
    assert repr(kwargs[field] if field in kwargs else next(iter(kwargs.values()))) in message


def test_unknown_field_suggests_the_close_name():
    with pytest.raises(ValueError, match="did you mean 'temperature'"):
        SamplingParams(temprature=0.7)
    with pytest.raises(ValueError, match="no field 'foo'"):
        SamplingParams.from_dict({"foo": 1})


def test_stop_accepts_a_single_string():
    assert SamplingParams(stop="\n").stop == ["\n"]


def test_generation_config_fills_only_what_the_caller_left_default():
    model_defaults = {"temperature": 0.6, "top_p": 0.9, "do_sample": True, "max_new_tokens": 64, "eos_token_id": 2}
    params = SamplingParams(top_p=0.5).with_model_defaults(model_defaults)
    assert params.temperature == 0.6 and params.do_sample and params.max_new_tokens == 64
    assert params.top_p == 0.5  # the caller's value wins
    assert SamplingParams().with_model_defaults({}) == SamplingParams()


@pytest.mark.parametrize("length_penalty", [-10.0, -1.0, 0.0, 2.0, 10.0])
def test_accepted_length_penalties_keep_beam_scores_finite(length_penalty):
    """Every length_penalty validation accepts leaves length ** length_penalty a finite float32."""
    import math

    import torch

    params = SamplingParams(num_beams=2, max_new_tokens=2000, length_penalty=length_penalty)
    for length in (1, 2, params.max_new_tokens):
        norm = torch.tensor(-3.0) / (length ** params.length_penalty)
        assert math.isfinite(float(norm))

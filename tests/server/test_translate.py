"""OpenAI request bodies -> prompts and SamplingParams: field mapping, defaults, limits, the chat end token."""

from __future__ import annotations

import pytest

from nextok.server.errors import ApiError
from nextok.server.protocol import ChatCompletionRequest, CompletionRequest
from nextok.server.settings import ServerSettings
from nextok.server.translate import ServedModel, chat_work, completion_work


@pytest.fixture
def model(default_tokenizer) -> ServedModel:
    return ServedModel(name="m", tokenizer=default_tokenizer, max_model_len=64,
                       eos_token_ids=default_tokenizer.eos_token_ids)


def params(model, **body):
    (work,) = completion_work(CompletionRequest(prompt="Hello", **body), model, ServerSettings())
    return work.params


@pytest.mark.parametrize("body, expected", [
    ({"temperature": 0}, {"do_sample": False}),
    ({"temperature": 0.7}, {"do_sample": True, "temperature": 0.7}),
    ({}, {"do_sample": True, "temperature": 1.0, "max_new_tokens": 16}),
    ({"num_beams": 3, "n": 2}, {"do_sample": False, "num_beams": 3, "num_return_sequences": 2}),
    ({"top_k": -1, "temperature": 1}, {"top_k": 0}),
    ({"max_tokens": 9, "min_tokens": 4, "seed": 5}, {"max_new_tokens": 9, "min_new_tokens": 4, "seed": 5}),
    ({"stop": "x", "stop_token_ids": [7]}, {"stop": ["x"], "stop_token_ids": [7]}),
    ({"logprobs": 2}, {"logprobs": 2}),
    ({"presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.2, "no_repeat_ngram_size": 3},
     {"presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.2, "no_repeat_ngram_size": 3}),
])
def test_field_mapping(model, body, expected):
    p = params(model, **body)
    assert {k: getattr(p, k) for k in expected} == expected


def test_chat_default_max_tokens_is_the_rest_of_the_context(model):
    (work,) = chat_work(ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}]), model, ServerSettings())
    assert work.params.max_new_tokens == 64 - len(work.prompt_token_ids)


@pytest.mark.parametrize("body, status, param", [
    ({"max_tokens": 100}, 400, "max_tokens"),
    ({"n": 2, "temperature": 0}, 400, "n"),
    ({"n": 17, "temperature": 1}, 400, "n"),
    ({"model": "other"}, 404, "model"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": list(range(64))}, 400, "prompt"),
])
def test_errors_name_the_field(model, body, status, param):
    with pytest.raises(ApiError) as e:
        completion_work(CompletionRequest(**{"prompt": "Hello", **body}), model, ServerSettings())
    assert (e.value.status, e.value.param) == (status, param)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="max_queue"):
        ServerSettings(max_queue=0)
    with pytest.raises(ValueError, match="request_timeout"):
        ServerSettings(request_timeout=-1)

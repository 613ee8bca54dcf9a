"""The server through the official `openai` client: every endpoint, streaming, n, logprobs, seeds, beams,
concurrency; and every kind of bad input answered with an OpenAI error object, never a 500."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from nextok import SamplingParams

PROMPT = "I enjoy walking with my cute dog"


# ---------------------------------------------------------------------- happy paths
def test_models_and_health(client, server, model_id):
    models = client.models.list()
    assert [m.id for m in models.data] == [model_id]
    assert client.models.retrieve(model_id).id == model_id
    health = server.health()
    assert health["status"] == "ok" and health["model"] == model_id


def test_completion_greedy_equals_generate(client, server, model_id, tiny_llm):
    result = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=12, temperature=0)
    expected = tiny_llm.generate(PROMPT, SamplingParams(max_new_tokens=12), use_tqdm=False)[0].outputs[0]
    (choice,) = result.choices
    assert choice.text == expected.text and choice.finish_reason == "length"
    assert result.usage.completion_tokens == 12
    assert result.usage.prompt_tokens == len(server.llm.tokenizer.encode(PROMPT))


def test_prompt_list_and_token_ids(client, model_id, server):
    ids = server.llm.tokenizer.encode(PROMPT)
    result = client.completions.create(model=model_id, prompt=[PROMPT, "Hello"], max_tokens=4, temperature=0)
    by_ids = client.completions.create(model=model_id, prompt=ids, max_tokens=4, temperature=0)
    assert [c.index for c in result.choices] == [0, 1]
    assert by_ids.choices[0].text == result.choices[0].text


def test_chat_completion(client, model_id, server, tiny_llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    result = client.chat.completions.create(model=model_id, messages=messages, max_tokens=8, temperature=0)
    (choice,) = result.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    prompt = server.llm.tokenizer.apply_chat_template(messages)
    assert result.usage.prompt_tokens == len(server.llm.tokenizer.encode(prompt, add_special_tokens=False))
    expected = tiny_llm.chat(messages, SamplingParams(max_new_tokens=8)).outputs[0].text
    assert choice.message.content == expected


@pytest.mark.parametrize("chat", [False, True])
def test_streaming_gives_the_same_text(client, model_id, chat):
    kwargs = dict(model=model_id, max_tokens=16, temperature=0)
    if chat:
        messages = [{"role": "user", "content": PROMPT}]
        whole = client.chat.completions.create(messages=messages, **kwargs).choices[0].message.content
        chunks = list(client.chat.completions.create(messages=messages, stream=True,
                                                     stream_options={"include_usage": True}, **kwargs))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[0].choices[0].delta.role == "assistant"
    else:
        whole = client.completions.create(prompt=PROMPT, **kwargs).choices[0].text
        chunks = list(client.completions.create(prompt=PROMPT, stream=True, stream_options={"include_usage": True},
                                                **kwargs))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16


def test_stream_ends_with_done(server, model_id):
    body = {"model": model_id, "prompt": PROMPT, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_n_samples(client, model_id):
    result = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=8, n=3, temperature=1.0, seed=1)
    assert sorted(c.index for c in result.choices) == [0, 1, 2]
    assert len({c.text for c in result.choices}) > 1
    assert result.usage.completion_tokens == 24
    chat = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, n=3, temperature=1.0)
    assert sorted(c.index for c in chat.choices) == [0, 1, 2]


def test_streaming_n_samples(client, model_id):
    chunks = list(client.completions.create(model=model_id, prompt=PROMPT, max_tokens=6, n=3, temperature=1.0,
                                            seed=3, stream=True))
    whole = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=6, n=3, temperature=1.0, seed=3)
    streamed = {i: "".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in range(3)}
    assert streamed == {c.index: c.text for c in whole.choices}


def test_logprobs(client, model_id):
    result = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    lp = result.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == result.choices[0].text
    assert all(1 <= len(top) <= 4 and max(top.values()) <= 0 for top in lp.top_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(chosen == pytest.approx(max(top.values())) for chosen, top in zip(lp.token_logprobs, lp.top_logprobs))

    chat = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(1 <= len(t.top_logprobs) <= 3 for t in content)
    assert "".join(t.token for t in content) == chat.choices[0].message.content


def test_seed_reproducible(client, model_id):
    def sample(seed):
        return client.completions.create(model=model_id, prompt=PROMPT, max_tokens=12, temperature=1.0,
                                         top_p=0.95, seed=seed).choices[0].text

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_beam_search_equals_generate(client, model_id, server, tiny_llm):
    extra = {"num_beams": 4, "no_repeat_ngram_size": 2, "length_penalty": 1.0, "early_stopping": True}
    result = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=10, n=2, temperature=0,
                                       extra_body=extra)
    params = SamplingParams(max_new_tokens=10, num_beams=4, num_return_sequences=2, no_repeat_ngram_size=2,
                            length_penalty=1.0, early_stopping=True)
    expected = tiny_llm.generate(PROMPT, params, use_tqdm=False)[0].outputs
    assert [c.text for c in result.choices] == [c.text for c in expected]
    streamed = list(client.completions.create(model=model_id, prompt=PROMPT, max_tokens=10, n=2, temperature=0,
                                              stream=True, extra_body=extra))
    assert {c.choices[0].index: c.choices[0].text for c in streamed} == {0: expected[0].text, 1: expected[1].text}


def test_extra_body_sampling_fields(client, model_id):
    extra = {"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.3, "min_tokens": 6, "ignore_eos": True}
    result = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=6, temperature=0.7, seed=0,
                                       presence_penalty=0.5, frequency_penalty=0.5, extra_body=extra)
    assert result.usage.completion_tokens == 6


def test_stop_string(client, model_id):
    text = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    stop = text[5:8]
    cut = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=12, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_concurrent_requests_share_steps(server, model_id, tiny_llm):
    client = server.client()
    prompts = [f"{PROMPT} number {i}" for i in range(8)]
    expected = [o.outputs[0].text for o in tiny_llm.generate(prompts, SamplingParams(max_new_tokens=24),
                                                                use_tqdm=False)]
    steps_before = server.health()["steps"]

    def one(prompt):
        return client.completions.create(model=model_id, prompt=prompt, max_tokens=24, temperature=0).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(one, prompts))
    assert texts == expected
    health = server.health()
    assert health["peak_batch"] > 1
    assert health["steps"] - steps_before < 8 * 24  # decode steps were shared


# ---------------------------------------------------------------------- bad input
def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def post(server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(server.url + path, timeout=30, **kwargs)


def test_malformed_json(server):
    error = _error(post(server, "/v1/completions", content=b'{"prompt": "x",', headers={
        "content-type": "application/json"}), 400)
    assert error["code"] == "invalid_json"


@pytest.mark.parametrize("body, param", [
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "x", "temperature": [1]}, "temperature"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({}, "prompt"),
])
def test_wrong_types_and_ranges(server, body, param):
    error = _error(post(server, "/v1/completions", json=body), 422)
    assert error["param"].startswith(param)


def test_chat_wrong_shape(server):
    _error(post(server, "/v1/chat/completions", json={"messages": "hello"}), 422)
    _error(post(server, "/v1/chat/completions", json={"messages": []}), 422)
    _error(post(server, "/v1/chat/completions", json=[1, 2]), 422)


def test_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-17", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-17")


def test_unknown_route(server):
    _error(httpx.get(server.url + "/v1/nothing", timeout=10), 404)


def test_prompt_longer_than_context(client, model_id, server):
    long_prompt = list(range(100, 100 + server.llm.model.max_positions + 5))
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_id, prompt=long_prompt, max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "prompt"


def test_max_tokens_too_large(client, model_id, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_id, prompt=PROMPT, max_tokens=server.llm.model.max_positions)
    assert e.value.body["param"] == "max_tokens"


def test_n_too_large(client, model_id):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_id, prompt=PROMPT, max_tokens=2, n=100, temperature=1)
    assert e.value.body["param"] == "n"


@pytest.mark.parametrize("kwargs, param", [
    (dict(n=2, temperature=0), "n"),  # greedy gives one sequence
    (dict(extra_body={"num_beams": 2, "min_tokens": 9}), "min_tokens"),  # min_tokens > max_tokens
    (dict(n=3, extra_body={"num_beams": 2}), "n"),  # more results than beams
    (dict(stop=["x"], extra_body={"num_beams": 2}), "stop"),  # stop strings with beam search
    (dict(stop=[""]), "stop"),
    (dict(prompt=[[10**9]]), "prompt"),  # token id outside the vocabulary
])
def test_invalid_combinations(client, model_id, kwargs, param):
    kwargs = {"prompt": PROMPT, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_id, **kwargs)
    assert e.value.body["param"] == param and e.value.body["message"]


def test_top_logprobs_needs_logprobs(client, model_id):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       top_logprobs=2)


def test_errors_leave_nothing_behind(server):
    health = server.wait_idle(0)
    assert health["pending_requests"] == 0 and health["kv_blocks_used"] == 0


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 2}', "prompt"),
    ("/v1/completions", b'{"prompt": "ab", "stop": ["x", "\\udfff"], "max_tokens": 2}', "stop[1]"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages[0].content"),
])
def test_lone_surrogates_are_a_400_naming_the_field(server, path, body, param):
    error = _error(post(server, path, content=body, headers={"content-type": "application/json"}), 400)
    assert error["code"] == "invalid_unicode" and error["param"] == param and "surrogate" in error["message"]

"""Faults: clients that leave, a full queue, requests over the time limit; KV blocks always come back."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.server.conftest import STRICT

# Requests that outlast every limit below: about 8,000 tokens take several seconds on the tiny model.
LONG_TOKENS = 8000
LONG = {"max_tokens": LONG_TOKENS, "temperature": 0, "extra_body": {"min_tokens": LONG_TOKENS}}


def test_stream_disconnect_frees_kv_blocks_at_once(server, model_id):
    baseline = server.wait_idle(0)["kv_blocks_used"]
    client = server.client()
    stream = client.completions.create(model=model_id, prompt="Once upon a time", stream=True, **LONG)
    received = [next(iter(stream)) for _ in range(3)]
    assert all(c.choices[0].text is not None for c in received)
    during = server.health()
    assert during["kv_blocks_used"] > baseline and during["pending_requests"] == 1
    stream.close()
    started = time.monotonic()
    after = server.wait_idle(baseline, timeout=3)
    assert after["kv_blocks_used"] == baseline and after["pending_requests"] == 0
    assert time.monotonic() - started < 2  # long before the LONG_TOKENS would have been generated


def test_non_stream_disconnect_cancels(server, model_id):
    baseline = server.wait_idle(0)["kv_blocks_used"]
    body = {"model": model_id, "prompt": "Once upon a time", "max_tokens": LONG_TOKENS, "min_tokens": LONG_TOKENS, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(10, read=0.5))
    after = server.wait_idle(baseline, timeout=3)
    assert after["kv_blocks_used"] == baseline and after["pending_requests"] == 0


def test_full_queue_answers_429(strict_server):
    client = strict_server.client(api_key=STRICT["api_key"])
    model = client.models.list().data[0].id
    stream = client.completions.create(model=model, prompt="Once upon a time", stream=True, **LONG)
    next(iter(stream))  # the one place in the queue is taken
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model=model, prompt="hello", max_tokens=2)
    assert time.monotonic() - started < 2
    assert e.value.response.headers["retry-after"] == "1"
    assert e.value.body["code"] == "rate_limit_exceeded"
    stream.close()
    assert strict_server.wait_idle(0)["pending_requests"] == 0
    assert client.completions.create(model=model, prompt="hello", max_tokens=2).choices[0].text is not None


@pytest.mark.parametrize("stream", [False, True])
def test_time_limit_ends_cleanly(strict_server, stream):
    client = strict_server.client(api_key=STRICT["api_key"])
    model = client.models.list().data[0].id
    strict_server.wait_idle(0)
    started = time.monotonic()
    if stream:
        chunks = list(client.completions.create(model=model, prompt="Once upon a time", stream=True,
                                                stream_options={"include_usage": True}, **LONG))
        finish = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finish[-1] == "timeout" and all(f is None for f in finish[:-1])
        tokens = chunks[-1].usage.completion_tokens
    else:
        result = client.completions.create(model=model, prompt="Once upon a time", **LONG)
        assert result.choices[0].finish_reason == "timeout" and result.choices[0].text
        tokens = result.usage.completion_tokens
    assert time.monotonic() - started < STRICT["request_timeout"] + 2
    assert 0 < tokens < LONG_TOKENS
    after = strict_server.wait_idle(0)
    assert after["kv_blocks_used"] == 0 and after["pending_requests"] == 0


def test_time_limit_beam_search_returns_best_so_far(strict_server):
    client = strict_server.client(api_key=STRICT["api_key"])
    model = client.models.list().data[0].id
    result = client.completions.create(model=model, prompt="Once upon a time", max_tokens=LONG_TOKENS, temperature=0, n=2,
                                       extra_body={"num_beams": 4, "min_tokens": LONG_TOKENS})
    assert [c.index for c in result.choices] == [0, 1]
    assert all(c.finish_reason == "timeout" and c.text for c in result.choices)
    assert strict_server.wait_idle(0)["kv_blocks_used"] == 0


def test_engine_failure_is_reported_and_the_server_goes_on(server, model_id, monkeypatch):
    engine = server.llm.engine
    real_step = engine.step
    failures = []

    def failing_step():
        if len(failures) < 2:
            failures.append(1)
            raise RuntimeError("injected engine fault")
        return real_step()

    monkeypatch.setattr(engine, "step", failing_step)
    client = server.client()
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model=model_id, prompt="hello", max_tokens=4)
    assert e.value.body["code"] == "internal_error"
    body = {"model": model_id, "prompt": "hello", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
        lines = [line for line in response.iter_lines() if line]
    assert '"internal_error"' in lines[-2] and lines[-1] == "data: [DONE]"
    assert client.completions.create(model=model_id, prompt="hello", max_tokens=4).usage.completion_tokens == 4
    assert server.wait_idle(0)["kv_blocks_used"] == 0

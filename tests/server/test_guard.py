"""The API key and the body-size limit, checked before a request reaches the app."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.conftest import STRICT


def test_missing_or_wrong_api_key(strict_server):
    for key in ("wrong", "sk-test-ke"):
        with pytest.raises(openai.AuthenticationError) as e:
            strict_server.client(api_key=key).models.list()
        assert e.value.body["code"] == "invalid_api_key"
    response = httpx.post(strict_server.url + "/v1/completions", json={"prompt": "x"}, timeout=10)
    assert response.status_code == 401 and response.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(strict_server.url + "/health", timeout=10).status_code == 200  # health needs no key


def test_right_api_key(strict_server):
    client = strict_server.client(api_key=STRICT["api_key"])
    model = client.models.list().data[0].id
    assert client.completions.create(model=model, prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_body_over_the_limit(strict_server):
    headers = {"Authorization": f"Bearer {STRICT['api_key']}"}
    big = {"prompt": "word " * (STRICT["max_body_bytes"] // 4)}
    response = httpx.post(strict_server.url + "/v1/completions", json=big, headers=headers, timeout=10)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(100):
            yield b"x" * 4096

    response = httpx.post(strict_server.url + "/v1/completions", content=chunks(), headers=headers, timeout=10)
    assert response.status_code == 413


def test_openai_client_gets_413(strict_server):
    client = strict_server.client(api_key=STRICT["api_key"])
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="m", prompt="word " * (STRICT["max_body_bytes"] // 4), max_tokens=2)
    assert e.value.status_code == 413

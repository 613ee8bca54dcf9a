"""Hostile input, sent raw (httpx with hand-made bytes, and plain sockets for malformed HTTP) so nothing
client-side cleans it: malformed JSON, wrong types, huge, negative and non-finite numbers, lone surrogates,
enormous lists, limits met and passed, wrong methods and content types, broken HTTP.

For every case: no 5xx, no reset connection, and every error is an OpenAI error object. After the whole
suite, a greedy request gives the same answer as before it."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import pytest

from tests.server.conftest import live_server
from tests.server.helpers import assert_error_object, parse_http, raw_exchange

MAX_LEN = 8192  # the tiny model's context
VOCAB = 49152
GREEDY = {"prompt": "I enjoy walking with my cute dog", "max_tokens": 12, "temperature": 0}
OK = {"prompt": "hi", "max_tokens": 2}  # a valid base that each case spoils one way


@pytest.fixture(scope="module")
def hostile_server(tiny_model_dir):
    with live_server(tiny_model_dir, header_timeout=2.0, body_timeout=2.0, keep_alive_timeout=2.0) as s:
        yield s


@pytest.fixture(scope="module")
def answer_before(hostile_server) -> str:
    return httpx.post(hostile_server.url + "/v1/completions", json=GREEDY, timeout=30).json()["choices"][0]["text"]


# ---------------------------------------------------------------------- how a case is sent
Outcome = tuple[int, str, bytes]  # status, content type, body
Sender = Callable[[object], Outcome]


@dataclass
class Case:
    send: Sender
    status: int | tuple[int, ...] | None = None  # what it must get; None: anything below 500


def _outcome(response: httpx.Response) -> Outcome:
    return response.status_code, response.headers.get("content-type", ""), response.content


def post(content: bytes, path: str = "/v1/completions", content_type: str | None = "application/json",
         **headers: str) -> Sender:
    headers = {**({"content-type": content_type} if content_type else {}), **headers}
    return lambda server: _outcome(httpx.post(server.url + path, content=content, headers=headers, timeout=60))


def body(data, path: str = "/v1/completions") -> Sender:
    """json.dumps, not httpx's json=: surrogates go out escaped and NaN as the bare token."""
    return post(json.dumps(data).encode(), path)


def completion(**fields) -> Sender:
    return body({**OK, **fields})


def chat(messages, **fields) -> Sender:
    return body({"messages": messages, "max_tokens": 2, **fields}, "/v1/chat/completions")


def method(verb: str, path: str) -> Sender:
    return lambda server: _outcome(httpx.request(verb, server.url + path, timeout=30))


def sock(data: bytes) -> Sender:
    def send(server) -> Outcome:
        received, _ = raw_exchange(server.port, data)
        status, headers, content = parse_http(received)
        return status, headers.get("content-type", ""), content
    return send


def _nested(depth: int) -> bytes:
    return b'{"prompt": ' + b"[" * depth + b"]" * depth + b', "max_tokens": 2}'


def _long_prompt(n: int) -> Sender:
    return completion(prompt=[(i % 500) + 100 for i in range(n)], max_tokens=1)


H = b"Host: x\r\n"
CASES = {
    # malformed JSON
    "truncated": Case(post(b'{"prompt": "x",'), 400),
    "trailing-comma": Case(post(b'{"prompt": "x",}'), 400),
    "single-quotes": Case(post(b"{'prompt': 'x'}"), 400),
    "bare-word": Case(post(b"hello"), 400),
    "empty-body": Case(post(b""), 422),
    "null": Case(post(b"null"), 422),
    "array": Case(post(b"[]"), 422),
    "number": Case(post(b"123"), 422),
    "string": Case(post(b'"prompt"'), 422),
    "trailing-garbage": Case(post(b'{"prompt": "x"} {"prompt": "y"}'), 400),
    "invalid-utf8": Case(post(b'{"prompt": "\xff\xfe", "max_tokens": 2}'), 400),
    "bom": Case(post(b'\xef\xbb\xbf{"prompt": "hi", "max_tokens": 2}')),
    "nested-100k": Case(post(_nested(100_000)), 400),
    "nested-900-in-content": Case(post(b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "x", '
                                       b'"extra": ' + b"[" * 900 + b"]" * 900 + b'}]}], "max_tokens": 2}',
                                       "/v1/chat/completions")),
    "5000-digit-int": Case(post(b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}"), 400),
    "duplicate-keys": Case(post(b'{"prompt": "x", "prompt": 5}'), 422),
    # non-finite numbers, as Python's json reads them
    "nan-temperature": Case(post(b'{"prompt": "x", "temperature": NaN}'), 422),
    "infinity-max-tokens": Case(post(b'{"prompt": "x", "max_tokens": Infinity}'), 422),
    "minus-infinity-penalty": Case(post(b'{"prompt": "x", "presence_penalty": -Infinity}'), 422),
    "nan-in-token-ids": Case(post(b'{"prompt": [1, NaN], "max_tokens": 2}'), 422),
    "1e999-top-p": Case(post(b'{"prompt": "x", "top_p": 1e999}'), 422),
    "nan-seed": Case(post(b'{"prompt": "x", "seed": NaN}'), 422),
    "nan-length-penalty": Case(post(b'{"prompt": "x", "num_beams": 2, "length_penalty": NaN}'), 422),
    # wrong types
    "prompt-object": Case(completion(prompt={}), 422),
    "prompt-bool": Case(completion(prompt=True), 422),
    "prompt-null": Case(completion(prompt=None), 422),
    "prompt-mixed-list": Case(completion(prompt=[1, "a"]), 422),
    "prompt-mixed-nesting": Case(completion(prompt=[[1], "a"]), 422),
    "n-string": Case(completion(n="two"), 422),
    "stream-list": Case(completion(stream=[1]), 422),
    "stop-number": Case(completion(stop=5), 422),
    "stop-numbers": Case(completion(stop=[1, 2]), 422),
    "stream-options-string": Case(completion(stream_options="x"), 422),
    "model-list": Case(completion(model=["a"]), 422),
    "temperature-object": Case(completion(temperature={}), 422),
    "messages-string": Case(chat("hello"), 422),
    "messages-empty": Case(chat([]), 422),
    "role-unknown": Case(chat([{"role": "wizard", "content": "x"}]), 422),
    "role-missing": Case(chat([{"content": "x"}]), 422),
    "content-number": Case(chat([{"role": "user", "content": 5}]), 422),
    "content-image": Case(chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
                          400),
    "content-part-without-text": Case(chat([{"role": "user", "content": [{"type": "text"}]}]), 400),
    # numbers out of range, huge and negative
    "max-tokens-0": Case(completion(max_tokens=0), 422),
    "max-tokens-negative": Case(completion(max_tokens=-1), 422),
    "max-tokens-10e30": Case(completion(max_tokens=10**30), 400),
    "n-0": Case(completion(n=0), 422),
    "n-negative": Case(completion(n=-1), 422),
    "n-at-limit": Case(completion(n=16, temperature=1), 200),
    "n-past-limit": Case(completion(n=17, temperature=1), 400),
    "n-past-schema": Case(completion(n=129, temperature=1), 422),
    "num-beams-at-limit": Case(completion(num_beams=16), 200),
    "num-beams-past-limit": Case(completion(num_beams=17), 400),
    "num-beams-0": Case(completion(num_beams=0), 422),
    "num-beams-past-schema": Case(completion(num_beams=65), 422),
    "n-over-beams": Case(completion(num_beams=2, n=3), 400),
    "temperature-negative": Case(completion(temperature=-1), 422),
    "temperature-tiny": Case(completion(temperature=1e-300), 400),
    "top-p-0": Case(completion(top_p=0), 422),
    "top-k-negative": Case(completion(top_k=-2), 422),
    "top-k-10e30": Case(completion(top_k=10**30, temperature=1)),
    "logprobs-21": Case(completion(logprobs=21), 422),
    "seed-negative": Case(completion(seed=-1), 422),
    "seed-2e64": Case(completion(seed=2**64), 422),
    "min-tokens-negative": Case(completion(min_tokens=-1), 422),
    "min-tokens-10e30": Case(completion(min_tokens=10**30), 400),
    "presence-penalty-1e308": Case(completion(presence_penalty=1e308), 422),
    "repetition-penalty-0": Case(completion(repetition_penalty=0), 422),
    "length-penalty-overflow": Case(completion(num_beams=2, length_penalty=100, max_tokens=2000,
                                               early_stopping="never"), (200, 400)),
    "no-repeat-ngram-65": Case(completion(no_repeat_ngram_size=65), 422),
    "stop-token-ids-65": Case(completion(stop_token_ids=list(range(65))), 422),
    "stop-token-ids-negative": Case(completion(stop_token_ids=[-5]), 400),
    "stop-token-ids-10e30": Case(completion(stop_token_ids=[10**30], min_tokens=2), 200),
    # enormous lists and strings
    "stop-65-strings": Case(completion(stop=["x"] * 65), 422),
    "stop-10000-strings": Case(completion(stop=[f"s{i}" for i in range(10_000)]), 422),
    "stop-1001-chars": Case(completion(stop="x" * 1001), 422),
    "stop-empty-string": Case(completion(stop=[""]), 400),
    "65-prompts": Case(completion(prompt=["hi"] * 65), 400),
    "body-over-limit": Case(completion(prompt="word " * 300_000), 413),
    # prompts at and past the context
    "prompt-at-context-minus-1": Case(_long_prompt(MAX_LEN - 1), 200),
    "prompt-at-context": Case(_long_prompt(MAX_LEN), 400),
    "prompt-past-context": Case(_long_prompt(MAX_LEN + 5), 400),
    "max-tokens-past-room": Case(completion(prompt=[100, 101], max_tokens=MAX_LEN - 1), 400),
    "token-id-at-vocab": Case(completion(prompt=[VOCAB]), 400),
    "token-id-negative": Case(completion(prompt=[-1, 5]), 400),
    "token-id-10e30": Case(completion(prompt=[10**30]), 400),
    "prompt-empty-string": Case(completion(prompt=""), 400),
    "prompt-empty-list": Case(completion(prompt=[]), 400),
    "prompt-empty-ids": Case(completion(prompt=[[]]), 400),
    # text that is not Unicode: lone surrogates
    "surrogate-prompt": Case(completion(prompt="\ud800"), 400),
    "surrogate-prompt-end": Case(completion(prompt="abc\ud83d"), 400),
    "surrogate-prompt-list": Case(completion(prompt=["ok", "a\udfffb"]), 400),
    "surrogate-stop": Case(completion(stop="\ud800"), 400),
    "surrogate-stop-list": Case(completion(stop=["x", "\udfff"]), 400),
    "surrogate-stream": Case(completion(prompt="\ud800", stream=True), 400),
    "surrogate-chat": Case(chat([{"role": "user", "content": "\ud800"}]), 400),
    "surrogate-chat-part": Case(chat([{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]), 400),
    "surrogate-chat-role": Case(chat([{"role": "\udfff", "content": "x"}]), 400),
    "surrogate-key": Case(completion(**{"\ud800": 1}), 400),
    "surrogate-model": Case(completion(model="\ud800"), 400),
    "surrogate-user": Case(completion(user="\ud800"), 400),
    "surrogate-pair-is-fine": Case(completion(prompt="a\ud83d\ude00b"), 200),
    # methods, routes, content types
    "get-completions": Case(method("GET", "/v1/completions"), 405),
    "put-chat": Case(method("PUT", "/v1/chat/completions"), 405),
    "delete-models": Case(method("DELETE", "/v1/models"), 405),
    "patch-health": Case(method("PATCH", "/health"), 405),
    "options-completions": Case(method("OPTIONS", "/v1/completions"), 405),
    "unknown-route": Case(method("GET", "/v2/anything"), 404),
    "route-suffix": Case(method("POST", "/v1/completions/extra"), 404),
    "long-path": Case(method("GET", "/v1/" + "a" * 8000), 404),
    "unknown-model-route": Case(method("GET", "/v1/models/%ed%a0%80"), 404),
    "text-plain": Case(post(json.dumps(OK).encode(), content_type="text/plain"), 415),
    "no-content-type": Case(post(json.dumps(OK).encode(), content_type=None), 415),
    "form-urlencoded": Case(post(b"prompt=hi", content_type="application/x-www-form-urlencoded"), 415),
    "multipart": Case(post(b"--b\r\n\r\nhi\r\n--b--", content_type="multipart/form-data; boundary=b"), 415),
    # broken HTTP, on a plain socket
    "garbage-request-line": Case(sock(b"GARBAGE\r\n\r\n"), 400),
    "bad-http-version": Case(sock(b"GET /health HTTP/9.9 x\r\n" + H + b"\r\n"), 400),
    "bad-content-length": Case(sock(b"POST /v1/completions HTTP/1.1\r\n" + H + b"Content-Length: abc\r\n\r\n"), 400),
    "negative-content-length": Case(sock(b"POST /v1/completions HTTP/1.1\r\n" + H + b"Content-Length: -5\r\n\r\n"),
                                    400),
    "two-content-lengths": Case(sock(b"POST /v1/completions HTTP/1.1\r\n" + H
                                     + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}"), 400),
    "header-without-colon": Case(sock(b"GET /health HTTP/1.1\r\n" + H + b"Bad Header\r\n\r\n"), 400),
    "no-host": Case(sock(b"GET /health HTTP/1.1\r\n\r\n"), 400),
    "non-ascii-target": Case(sock(b"GET /v1/\xff\xfe HTTP/1.1\r\n" + H + b"\r\n"), 400),
    "bad-chunk": Case(sock(b"POST /v1/completions HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
                           b"Content-Type: application/json\r\n\r\nZZ\r\n"), 400),
    "headers-over-limit": Case(sock(b"GET /health HTTP/1.1\r\n" + H + b"X: " + b"a" * 17_000), 431),
    "half-headers": Case(sock(b"GET /health HTTP/1.1\r\n" + H), 408),
    "content-length-lies": Case(sock(b"POST /v1/completions HTTP/1.1\r\n" + H + b"Content-Type: application/json\r\n"
                                     b"Content-Length: 100\r\n\r\n{\"prompt\""), 408),
    "chunked-body-is-fine": Case(sock(b"POST /v1/completions HTTP/1.1\r\n" + H + b"Connection: close\r\n"
                                      b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
                                      b"d\r\n{\"prompt\": \"h\r\n14\r\ni\", \"max_tokens\": 2}\r\n0\r\n\r\n"), 200),
}


def test_the_suite_is_large_enough():
    assert len(CASES) >= 60


def test_answer_before(answer_before):
    assert answer_before


@pytest.mark.parametrize("name", list(CASES))
def test_hostile(hostile_server, answer_before, name):
    case = CASES[name]
    status, content_type, content = case.send(hostile_server)
    assert status < 500, (name, status, content[:500])
    if case.status is not None:
        expected = case.status if isinstance(case.status, tuple) else (case.status,)
        assert status in expected, (name, status, content[:500])
    if status >= 400:
        assert content_type.startswith("application/json"), (name, content_type, content[:200])
        error = assert_error_object(json.loads(content))
        assert error["type"] in ("invalid_request_error", "rate_limit_error"), error
    elif content_type.startswith("text/event-stream"):
        assert content.endswith(b"data: [DONE]\n\n"), content[-200:]
    else:
        assert json.loads(content)["choices"], content[:200]


def test_same_answer_after_the_suite(hostile_server, answer_before):
    after = httpx.post(hostile_server.url + "/v1/completions", json=GREEDY, timeout=30).json()["choices"][0]["text"]
    assert after == answer_before
    health = hostile_server.wait_idle(0)
    assert health["pending_requests"] == 0 and health["kv_blocks_used"] == 0

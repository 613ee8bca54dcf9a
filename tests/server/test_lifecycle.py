"""A request's and a connection's life at the edges: the time limit ends a request with finish_reason
"timeout"; a drain that runs out ends every open stream with an error chunk and [DONE]; idle and
half-sent connections are closed by the header, body and keep-alive timeouts, while a long request is not."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from nextok.server.answer import ServerState, _submit
from nextok.server.connection import NextokH11Protocol
from nextok.server.errors import ApiError
from nextok.server.run import FINAL_WORDS_S, NextokServer, uvicorn_config
from nextok.server.settings import ServerSettings
from tests.server.conftest import live_server
from tests.server.helpers import assert_error_object, call, parse_http, raw_exchange, read_stream

LONG = {"prompt": "Once upon a time", "max_tokens": 8000, "min_tokens": 8000, "temperature": 0}
EDGE = dict(header_timeout=1.0, body_timeout=1.0, keep_alive_timeout=1.0, request_timeout=2.5)
SLACK = 1.5  # scheduling slack on a busy 2-core machine


@pytest.fixture(scope="module")
def edge_server(tiny_model_dir):
    """One-second connection timeouts and a 2.5 s time limit: a request outlives every connection timeout."""
    with live_server(tiny_model_dir, **EDGE) as s:
        yield s


def test_nextok_serve_config(edge_server):
    config = uvicorn_config(edge_server.app, ServerSettings(**EDGE, drain_timeout=7))
    assert config.http is NextokH11Protocol and config.header_timeout == 1.0
    assert config.timeout_keep_alive == 1.0 and config.timeout_graceful_shutdown == 7 + FINAL_WORDS_S
    assert isinstance(edge_server.server, NextokServer)  # the tests run what `nextok serve` runs


@pytest.mark.parametrize("bad", [dict(header_timeout=0), dict(body_timeout=-1), dict(keep_alive_timeout=float("nan")),
                                 dict(header_timeout="5"), dict(drain_timeout=float("inf"))])
def test_timeout_settings_are_checked(bad):
    (name,) = bad
    with pytest.raises(ValueError, match=name):
        ServerSettings(**bad)


# ---------------------------------------------------------------------- the time limit
@pytest.mark.parametrize("stream", [False, True])
def test_time_limit_ends_every_choice_with_timeout(edge_server, stream):
    started = time.monotonic()
    messages = [{"role": "user", "content": "Tell me a story"}]
    body = {"messages": messages, "max_tokens": 8000, "min_tokens": 8000, "n": 2, "temperature": 1, "seed": 1}
    if stream:
        with httpx.stream("POST", edge_server.url + "/v1/chat/completions", json={**body, "stream": True},
                          timeout=30) as response:
            result = read_stream(response.iter_lines())
        assert result.done and result.error is None
        finish = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"] for c in result.chunks
                  if c["choices"] and c["choices"][0]["finish_reason"]}
        assert finish == {0: "timeout", 1: "timeout"}
    else:
        data = httpx.post(edge_server.url + "/v1/chat/completions", json=body, timeout=30).json()
        assert [c["finish_reason"] for c in data["choices"]] == ["timeout", "timeout"]
        assert all(c["message"]["content"] for c in data["choices"])
    assert time.monotonic() - started < EDGE["request_timeout"] + SLACK
    assert edge_server.wait_idle(0)["kv_blocks_used"] == 0


# ---------------------------------------------------------------------- connection timeouts
def test_idle_connection_is_closed(edge_server):
    received, seconds = raw_exchange(edge_server.port, b"")
    assert received == b"" and seconds < EDGE["header_timeout"] + SLACK


@pytest.mark.parametrize("trickle", [False, True])
def test_half_sent_headers_get_408(edge_server, trickle):
    with socket.create_connection(("127.0.0.1", edge_server.port), timeout=10) as s:
        started = time.monotonic()
        s.sendall(b"GET /health HTTP/1.1\r\n")
        if trickle:  # a byte now and then must not keep the connection open
            try:
                for byte in b"Host: localhost\r\nX-Slow: 1":
                    s.sendall(bytes([byte]))
                    time.sleep(0.2)
            except OSError:
                pass  # closed on us: the point
        received = b""
        while chunk := s.recv(65536):
            received += chunk
    status, headers, content = parse_http(received)
    assert status == 408 and headers["connection"] == "close"
    assert assert_error_object(json.loads(content))["code"] == "request_timeout"
    assert time.monotonic() - started < EDGE["header_timeout"] + SLACK


def test_half_sent_body_gets_408(edge_server):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 200\r\n\r\n")
    received, seconds = raw_exchange(edge_server.port, head + b'{"prompt": "hi", ')
    status, headers, content = parse_http(received)
    assert status == 408 and assert_error_object(json.loads(content))["code"] == "request_timeout"
    assert seconds < EDGE["body_timeout"] + SLACK
    assert edge_server.wait_idle(0)["pending_requests"] == 0


@pytest.mark.parametrize("trickle", [False, True])
def test_keep_alive_connection_is_closed_after_a_response(edge_server, trickle):
    with socket.create_connection(("127.0.0.1", edge_server.port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        received = s.recv(65536)
        assert parse_http(received)[0] == 200
        started = time.monotonic()
        if trickle:
            try:
                for byte in b"GET /health HTTP/1.1\r\n":
                    s.sendall(bytes([byte]))
                    time.sleep(0.2)
            except OSError:
                pass
        while s.recv(65536):
            pass
    assert time.monotonic() - started < max(EDGE["keep_alive_timeout"], EDGE["header_timeout"]) + SLACK


@pytest.mark.parametrize("stream", [False, True])
def test_a_long_request_outlives_the_connection_timeouts(edge_server, stream):
    """The header timer stops once a request's headers are in: a 2.5 s request is answered whole."""
    started = time.monotonic()
    result = call(edge_server.url, LONG, stream=stream)
    assert time.monotonic() - started > EDGE["header_timeout"] + 0.5
    assert result.status == 200 and result.error is None and result.finish_reason == "timeout" and result.text
    if stream:
        assert result.done


def test_keep_alive_reuses_the_connection(edge_server):
    with httpx.Client(base_url=edge_server.url, timeout=10) as client:
        first = client.get("/health")
        second = client.get("/health")
    assert first.status_code == second.status_code == 200


# ---------------------------------------------------------------------- shutdown
def test_drain_that_runs_out_ends_open_streams_with_an_error_chunk(tiny_model_dir):
    drain = 1.0
    with live_server(tiny_model_dir, drain_timeout=drain) as server:
        with ThreadPoolExecutor(3) as pool, httpx.stream("POST", server.url + "/v1/completions",
                                                          json={**LONG, "stream": True}, timeout=30) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line)
            assert first.startswith("data: {")
            whole = pool.submit(call, server.url, LONG)  # a non-stream request in flight too
            short = pool.submit(call, server.url, {"prompt": "hi", "max_tokens": 4, "temperature": 0}, True)
            assert short.result(timeout=10).done  # finished before the shutdown began
            time.sleep(0.3)
            started = time.monotonic()
            stopping = pool.submit(server.stop, 30)
            rest = read_stream(lines)
            ended = time.monotonic() - started
            assert rest.done and rest.error is not None, rest
            assert rest.error["code"] == "server_shutting_down" and rest.error["type"] == "server_error"
            assert drain - 0.2 < ended < drain + FINAL_WORDS_S
            answer = whole.result(timeout=10)
            assert answer.status == 503 and answer.error["code"] == "server_shutting_down"
            stopping.result(timeout=30)
        assert not server._thread.is_alive()


def test_a_draining_server_refuses_new_requests():
    """Once the drain began, a request that still reaches the app (any ASGI server) gets 503, not a job."""
    state = ServerState(llm=None, model=None, settings=ServerSettings(), draining=True)
    with pytest.raises(ApiError) as e:
        asyncio.run(_submit(state, [], stream=False))
    assert e.value.status == 503 and e.value.code == "server_shutting_down" and e.value.type == "server_error"

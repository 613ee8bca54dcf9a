"""`nextok serve` as a process: it serves, SIGTERM lets in-flight requests finish before it exits, and a drain
that runs out ends an open stream with an error chunk and [DONE]; its flags and their checks."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.server.helpers import assert_error_object, parse_http, raw_exchange, read_stream


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nextok() -> list[str]:
    script = Path(sys.executable).parent / "nextok"
    return [str(script)] if script.exists() else [sys.executable, "-m", "nextok.cli"]


def _serve(model_dir, *flags: str) -> tuple[subprocess.Popen, str]:
    """`nextok serve` on a free port, once /health answers: (the process, its URL)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([*_nextok(), "serve", "--model", str(model_dir), "--port", str(port),
                             "--dtype", "float32", "--kv-cache-gb", "0.0625", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(proc.communicate(timeout=5))
        time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


def test_serve_help_lists_the_timeouts(capsys):
    from nextok.cli import build_parser

    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    for flag in ("--header-timeout", "--body-timeout", "--keep-alive-timeout", "--drain-timeout",
                 "--request-timeout"):
        assert flag in text
    args = parser.parse_args(["serve", "--header-timeout", "3", "--body-timeout", "4", "--keep-alive-timeout", "2"])
    assert (args.header_timeout, args.body_timeout, args.keep_alive_timeout) == (3.0, 4.0, 2.0)


def test_serve_refuses_a_bad_timeout(tiny_model_dir):
    from nextok.cli import main

    assert main(["serve", "--model", str(tiny_model_dir), "--header-timeout", "0"]) == 2


def test_sigterm_drains_in_flight_requests_then_exits(tiny_model_dir):
    proc, url = _serve(tiny_model_dir)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        model = client.models.list().data[0].id
        stream = client.completions.create(model=model, prompt="Once upon a time", max_tokens=200, temperature=0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"min_tokens": 200})
        chunks = iter(stream)
        first = next(chunks)
        proc.send_signal(signal.SIGTERM)
        rest = list(chunks)  # the request in flight runs to its end
        finish = [c.choices[0].finish_reason for c in [first, *rest] if c.choices]
        assert finish[-1] == "length"
        assert rest[-1].usage.completion_tokens == 200
        assert proc.wait(timeout=30) == 0
        try:
            httpx.get(url + "/health", timeout=2)
            raise AssertionError("the server still answers after SIGTERM")
        except httpx.TransportError:
            pass
    finally:
        _stop(proc)


def test_sigterm_drain_that_runs_out_ends_the_stream_with_an_error_chunk(tiny_model_dir):
    proc, url = _serve(tiny_model_dir, "--drain-timeout", "1", "--header-timeout", "2")
    try:
        # uvicorn's own answers come from nextok's protocol: a malformed request gets an OpenAI error object
        received, _ = raw_exchange(int(url.rsplit(":", 1)[1]), b"GARBAGE\r\n\r\n")
        status, headers, content = parse_http(received)
        assert status == 400 and assert_error_object(json.loads(content))["code"] == "invalid_http_request"
        body = {"prompt": "Once upon a time", "max_tokens": 8000, "min_tokens": 8000, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line).startswith("data: {")
            proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            rest = read_stream(lines)
        assert rest.done and rest.error is not None and rest.error["code"] == "server_shutting_down", rest
        assert time.monotonic() - started < 1 + 3
        assert proc.wait(timeout=30) == 0
    finally:
        _stop(proc)

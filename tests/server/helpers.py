"""Raw HTTP helpers for the server tests: one call (whole or streamed) read into a Result, nothing sanitized."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Result:
    """What one request got: the status, and either its first choice (text, finish_reason) or its error.
    A stream also tells whether it ended with `data: [DONE]`."""

    status: int
    text: str | None = None
    finish_reason: str | None = None
    error: dict | None = None
    done: bool = False
    chunks: list[dict] = field(default_factory=list)


def call(url: str, body: dict, stream: bool = False, path: str = "/v1/completions", timeout: float = 20) -> Result:
    body = {**body, "stream": True} if stream else body
    if not stream:
        response = httpx.post(url + path, json=body, timeout=timeout)
        data = response.json()
        if response.status_code != 200:
            return Result(response.status_code, error=assert_error(response))
        choice = data["choices"][0]
        text = choice["text"] if "text" in choice else choice["message"]["content"]
        return Result(200, text, choice["finish_reason"])
    with httpx.stream("POST", url + path, json=body, timeout=timeout) as response:
        if response.status_code != 200:
            response.read()
            return Result(response.status_code, error=assert_error(response))
        return read_stream(response.iter_lines())


def read_stream(lines) -> Result:
    result = Result(200, text="")
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        assert not result.done, "data after [DONE]"
        payload = line[len("data: "):]
        if payload == "[DONE]":
            result.done = True
            continue
        chunk = json.loads(payload)
        result.chunks.append(chunk)
        if "error" in chunk:
            assert_error_object(chunk)
            result.error = chunk["error"]
            continue
        for choice in chunk["choices"]:
            if choice.get("index", 0) == 0:
                result.text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                result.finish_reason = choice["finish_reason"] or result.finish_reason
    return result


def assert_error_object(data: dict) -> dict:
    """`{"error": {"message": str, "type": str, "param": ..., "code": ...}}`, as the OpenAI API sends it."""
    assert set(data) == {"error"}, data
    error = data["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    return error


def assert_error(response: httpx.Response) -> dict:
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    return assert_error_object(response.json())


def raw_exchange(port: int, data: bytes, wait: float = 10.0, pause_after: float | None = None) -> tuple[bytes, float]:
    """Send `data` on a fresh connection (optionally nothing more for pause_after seconds), then read until the
    server closes; (what came back, seconds until it closed). Raises on a reset connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        started = time.monotonic()
        if data:
            sock.sendall(data)
        received = b""
        while True:
            chunk = sock.recv(65536)  # socket.timeout fails the test: the server held the connection
            if not chunk:
                return received, time.monotonic() - started
            received += chunk


def parse_http(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """The first response in `raw`: status, headers (lower-case names), body (by Content-Length)."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", len(rest)))
    return status, headers, rest[:length]

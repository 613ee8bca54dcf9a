"""`nextok serve` as a process: it serves, and SIGTERM lets in-flight requests finish before it exits."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nextok() -> list[str]:
    script = Path(sys.executable).parent / "nextok"
    return [str(script)] if script.exists() else [sys.executable, "-m", "nextok.cli"]


def test_sigterm_drains_in_flight_requests_then_exits(tiny_model_dir):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([*_nextok(), "serve", "--model", str(tiny_model_dir), "--port", str(port),
                             "--dtype", "float32", "--kv-cache-gb", "0.0625"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate(timeout=5)
            time.sleep(0.1)
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
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

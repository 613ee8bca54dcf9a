"""Real servers on loopback ports, each with its own tiny model, and OpenAI clients for them."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest


class LiveServer:
    """build_app(llm) on a free 127.0.0.1 port, in a background thread, run by the same uvicorn Config
    and Server classes as `nextok serve` (nextok.server.run), so the tests cover its protocol and drain.

    `llm` then belongs to the server's engine thread: tests compute expected outputs with another
    LLM of the same weights (the `tiny_llm` fixture), never by calling this one.
    """

    def __init__(self, llm, settings) -> None:
        from nextok.server.app import build_app
        from nextok.server.run import NextokServer, uvicorn_config

        self.llm = llm
        self.settings = settings
        self.app = build_app(llm, settings)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = NextokServer(uvicorn_config(self.app, settings, port=self.port))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    def start(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 15) -> None:
        """Shut down as on SIGTERM: drain, then stop."""
        self.server.should_exit = True
        self._thread.join(timeout)

    def client(self, api_key: str = "unused", **kwargs):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0,
                             timeout=kwargs.pop("timeout", 30.0), **kwargs)

    def health(self) -> dict:
        import httpx

        return httpx.get(self.url + "/health", timeout=10).json()

    def wait_idle(self, baseline_blocks: int, timeout: float = 5.0) -> dict:
        """Poll /health until nothing is pending and the KV blocks are back at the baseline."""
        deadline = time.monotonic() + timeout
        while True:
            health = self.health()
            if health["pending_requests"] == 0 and health["kv_blocks_used"] == baseline_blocks:
                return health
            if time.monotonic() > deadline:
                return health
            time.sleep(0.02)


@contextlib.contextmanager
def live_server(model_dir, **settings) -> Iterator[LiveServer]:
    from nextok import LLM
    from nextok.server.settings import ServerSettings

    llm = LLM(str(model_dir), dtype="float32", kv_cache_memory=64 << 20)
    settings.setdefault("drain_timeout", 5.0)  # a test that leaves a stream open does not hold the session
    server = LiveServer(llm, ServerSettings(**settings)).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def server(tiny_model_dir) -> Iterator[LiveServer]:
    """The default-settings server most tests share."""
    with live_server(tiny_model_dir) as s:
        yield s


@pytest.fixture
def client(server):
    return server.client()


@pytest.fixture(scope="session")
def model_id(server) -> str:
    return server.app.state.nextok.model.name


STRICT = dict(api_key="sk-test-key", max_queue=1, request_timeout=1.0, max_body_bytes=64 << 10)


@pytest.fixture(scope="session")
def strict_server(tiny_model_dir) -> Iterator[LiveServer]:
    """A server with tight limits: an API key, one request in flight, a 1 s time limit, 64 KiB bodies."""
    with live_server(tiny_model_dir, **STRICT) as s:
        yield s

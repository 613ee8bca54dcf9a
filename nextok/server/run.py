"""How `nextok serve` runs the app on uvicorn: one function builds the Config (nextok's HTTP protocol and
timeouts), and a Server subclass drains on shutdown. The tests' live servers use both, so they test
what `nextok serve` runs. `build_app` itself stays a plain ASGI app any server can run."""

from __future__ import annotations

from typing import Any

import uvicorn

from nextok.server.connection import NextokH11Protocol
from nextok.server.settings import ServerSettings

# After the drain runs out, the time to write each open stream's error chunk and [DONE] before uvicorn
# cancels whatever is still running.
FINAL_WORDS_S = 3.0


class NextokConfig(uvicorn.Config):
    """uvicorn's Config with the header timeout that NextokH11Protocol reads."""

    def __init__(self, app: Any, header_timeout: float | None, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.header_timeout = header_timeout


def uvicorn_config(app: Any, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000,
                   log_level: str = "warning", **kwargs: Any) -> NextokConfig:
    """The uvicorn Config `nextok serve` runs `app` (from build_app) with: the h11 protocol with a header
    timeout and JSON errors, no websockets, settings.keep_alive_timeout between requests, and a graceful
    shutdown that outlasts settings.drain_timeout. Extra keyword arguments go to uvicorn.Config."""
    return NextokConfig(app, header_timeout=settings.header_timeout, host=host, port=port, log_level=log_level,
                        http=NextokH11Protocol, ws="none", timeout_keep_alive=settings.keep_alive_timeout,
                        timeout_graceful_shutdown=settings.drain_timeout + FINAL_WORDS_S, **kwargs)


class NextokServer(uvicorn.Server):
    """uvicorn's Server whose shutdown (SIGTERM, SIGINT, should_exit) first starts the app's drain: new
    requests get 503, and requests still running after drain_timeout end with an error (a stream: an error
    chunk and `data: [DONE]`) rather than being cut when uvicorn's own timeout cancels them."""

    async def shutdown(self, sockets: list | None = None) -> None:
        state = getattr(getattr(self.config.app, "state", None), "nextok", None)
        if state is not None:
            state.begin_drain()
        await super().shutdown(sockets)

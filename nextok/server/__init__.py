"""An OpenAI-compatible HTTP server on the engine: `build_app(llm)` for any ASGI server; `nextok serve` runs it
on uvicorn with nextok.server.run (its HTTP protocol, connection timeouts and drain)."""

from __future__ import annotations

from typing import Any

__all__ = ["build_app", "ServerSettings"]


def __getattr__(name: str) -> Any:
    # Import FastAPI only when the app is built, so `nextok --help` stays quick.
    if name == "build_app":
        from nextok.server.app import build_app

        return build_app
    if name == "ServerSettings":
        from nextok.server.settings import ServerSettings

        return ServerSettings
    raise AttributeError(f"module 'nextok.server' has no attribute {name!r}")

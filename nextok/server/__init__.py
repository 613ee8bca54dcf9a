"""An OpenAI-compatible HTTP server on the engine: `nextok serve`, or `build_app(llm)` for any ASGI server."""

from __future__ import annotations

from typing import Any

__all__ = ["build_app", "ServerSettings", "register_serve_command"]


def __getattr__(name: str) -> Any:
    # Import FastAPI only when the app is built, so `nextok --help` stays quick.
    if name == "build_app":
        from nextok.server.app import build_app

        return build_app
    if name == "ServerSettings":
        from nextok.server.settings import ServerSettings

        return ServerSettings
    if name == "register_serve_command":
        from nextok.server.cli import register_serve_command

        return register_serve_command
    raise AttributeError(f"module 'nextok.server' has no attribute {name!r}")

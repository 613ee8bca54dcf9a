"""ServerSettings: the server's limits, checked once at start."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class ServerSettings:
    """Limits and options of `nextok serve`.

    max_queue: engine requests (one per prompt) waiting or running at once; beyond it a request
    gets 429 with Retry-After instead of a queue that grows without bound.
    request_timeout: seconds a request may run; then it ends with what it has (finish_reason "timeout").
    drain_timeout: on SIGTERM, seconds to let in-flight requests finish; then each still running ends
    with an error (a stream: an error chunk and `data: [DONE]`).
    header_timeout: seconds a connection may take to send a request's headers (counted from when it
    connects, or from the previous response); then it is closed (408 when half the headers came).
    body_timeout: seconds a request may take to send its whole body once its headers are in; then 408.
    keep_alive_timeout: seconds an idle keep-alive connection stays open between requests.
    """

    api_key: str | None = None
    served_model_name: str | None = None
    max_queue: int = 256
    request_timeout: float | None = 600.0
    max_body_bytes: int = 1 << 20
    max_n: int = 16
    max_prompts: int = 64
    max_tokens_limit: int | None = None
    drain_timeout: float = 30.0
    retry_after_s: int = 1
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive_timeout: float = 5.0

    def __post_init__(self) -> None:
        for name in ("max_queue", "max_body_bytes", "max_n", "max_prompts", "retry_after_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ServerSettings.{name}={value!r} is invalid: use a whole number >= 1.")
        if self.max_tokens_limit is not None and self.max_tokens_limit < 1:
            raise ValueError(f"ServerSettings.max_tokens_limit={self.max_tokens_limit!r} is invalid: use >= 1 or None.")
        if self.request_timeout is not None and not _seconds(self.request_timeout, positive=True):
            raise ValueError(f"ServerSettings.request_timeout={self.request_timeout!r} is invalid: use seconds > 0 "
                             "or None for no limit.")
        if not _seconds(self.drain_timeout, positive=False):
            raise ValueError(f"ServerSettings.drain_timeout={self.drain_timeout!r} is invalid: use seconds >= 0.")
        for name in ("header_timeout", "body_timeout", "keep_alive_timeout"):
            value = getattr(self, name)
            if not _seconds(value, positive=True):
                raise ValueError(f"ServerSettings.{name}={value!r} is invalid: use a finite number of seconds > 0.")
        if self.api_key == "":
            raise ValueError("ServerSettings.api_key is empty: give a key, or None to serve without one.")


def _seconds(value: object, positive: bool) -> bool:
    """A finite number of seconds, > 0 (positive) or >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return value > 0 if positive else value >= 0

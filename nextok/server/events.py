"""What the engine thread and the HTTP handlers exchange: a Job (one HTTP request's work) and its events.

A job's events, in order: Accepted or Failed first, then Deltas while it streams, then Finished or
Failed. Every job gets a last event (Finished or Failed) whatever fails, so no handler waits forever.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from nextok.engine.sequence import Request
from nextok.outputs import RequestOutput
from nextok.server.errors import ApiError
from nextok.server.translate import Work


@dataclass
class Accepted:
    """Every prompt of the job is in the engine."""


@dataclass
class Failed:
    """The job ended without a result. status: 400 when the request caused it (its parameters), 500 when
    the server failed on it, 503 when the server is shutting down."""

    message: str
    status: int = 400
    code: str | None = None
    param: str | None = None

    @property
    def type(self) -> str:
        return "invalid_request_error" if self.status < 500 else "server_error"

    def error(self) -> ApiError:
        """As the OpenAI error object a client gets (the status of a whole response, or a stream's error chunk)."""
        return ApiError(self.status, self.message, type=self.type, param=self.param, code=self.code)


def server_failure(message: str) -> Failed:
    """The server failed on a job (not the client's fault): a 500."""
    return Failed(message, status=500, code="internal_error")


def shutting_down() -> Failed:
    return Failed("The server is shutting down and did not finish this request; retry it.", status=503,
                  code="server_shutting_down")


@dataclass
class Delta:
    """New output of one completion of a streaming job."""

    prompt_index: int
    index: int  # the completion's index within its prompt
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None


@dataclass
class Finished:
    outputs: list[RequestOutput]  # one per prompt, in order
    timed_out: bool = False  # the server's time limit ended it (its completions: finish_reason "timeout")


Event = Accepted | Failed | Delta | Finished


@dataclass(eq=False)
class Job:
    """One HTTP request's work. `events` belongs to the event loop; the rest to the engine thread."""

    work: list[Work]
    stream: bool
    loop: asyncio.AbstractEventLoop
    deadline: float | None = None  # time.monotonic() after which the job ends with what it has
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    requests: list[Request] = field(default_factory=list)
    # (prompt index, completion index) -> (characters sent, tokens sent, finished)
    progress: dict[tuple[int, int], tuple[int, int, bool]] = field(default_factory=dict)
    ended: bool = False  # event-loop side: Finished or Failed was read
    released: bool = False  # event-loop side: its place in the queue was given back

"""Running one HTTP request's job on the engine thread and answering it: whole, or as an event stream.

Every way a job can end is answered: a result (200), an error object with the status of its cause
(400 when the request caused it, 500 when the server failed, 503 while shutting down), or, once a
stream has started, an error chunk followed by `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from nextok.server.engine_loop import EngineLoop
from nextok.server.errors import ApiError, SafeJSONResponse, internal_error
from nextok.server.events import Delta, Failed, Finished, Job, shutting_down
from nextok.server.responses import ResponseWriter, sse
from nextok.server.settings import ServerSettings
from nextok.server.translate import ServedModel, Work

log = logging.getLogger("nextok.server")


@dataclass
class ServerState:
    """What the routes share; `pending` and `draining` are only touched on the event loop."""

    llm: object
    model: ServedModel
    settings: ServerSettings
    engine_loop: EngineLoop | None = None
    pending: int = 0  # engine requests submitted and not yet released
    started: int = 0
    draining: bool = False

    def begin_drain(self) -> None:
        """Shutdown began: refuse new requests (503); after settings.drain_timeout, end every job still
        running, so a stream gets an error chunk and `data: [DONE]` instead of being cut. Call it on the
        app's event loop (the ASGI server's), before the server waits for the requests in flight."""
        if self.draining:
            return
        self.draining = True
        if self.engine_loop is not None:
            asyncio.get_running_loop().call_later(self.settings.drain_timeout, self.engine_loop.fail_all,
                                                  shutting_down())


async def answer(state: ServerState, request: Request, work: list[Work], writer: ResponseWriter, stream: bool,
                 include_usage: bool) -> Response:
    job = await _submit(state, work, stream)
    if not stream:
        event = await _wait_for_end(state, job, request)
        if event is None:  # the client left; nobody reads this
            return Response(status_code=204)
        try:
            body = writer.response(event.outputs)
        except Exception:
            log.exception("could not build a response")
            raise internal_error("The server failed to build this response; see its log.") from None
        return SafeJSONResponse(body)
    return _EventStream(_events(state, job, writer, include_usage), release=lambda: _release(state, job),
                        media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _submit(state: ServerState, work: list[Work], stream: bool) -> Job:
    settings = state.settings
    if state.draining:
        raise ApiError(503, "The server is shutting down; send this request to another instance or retry later.",
                       type="server_error", code="server_shutting_down")
    if state.pending + len(work) > settings.max_queue:
        raise ApiError(429, f"The server is busy ({state.pending} requests in flight, limit {settings.max_queue}); "
                       f"retry in {settings.retry_after_s} s.", type="rate_limit_error", code="rate_limit_exceeded",
                       headers={"Retry-After": str(settings.retry_after_s)})
    timeout = settings.request_timeout
    job = Job(work=work, stream=stream, loop=asyncio.get_running_loop(),
              deadline=None if timeout is None else time.monotonic() + timeout)
    state.pending += len(work)
    state.engine_loop.submit(job)
    try:
        first = await job.events.get()
    except BaseException:
        _release(state, job)
        raise
    if isinstance(first, Failed):
        job.ended = True
        _release(state, job)
        raise first.error()
    return job


async def _wait_for_end(state: ServerState, job: Job, request: Request) -> Finished | None:
    """The job's Finished event, or None when the client disconnects first (the job is then cancelled)."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        while True:
            get = asyncio.ensure_future(job.events.get())
            await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                return None
            event = get.result()
            if isinstance(event, Finished):
                job.ended = True
                return event
            if isinstance(event, Failed):
                job.ended = True
                raise event.error()
    finally:
        gone.cancel()
        _release(state, job)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _events(state: ServerState, job: Job, writer: ResponseWriter, include_usage: bool) -> AsyncIterator[bytes]:
    try:
        while True:
            event = await job.events.get()
            if isinstance(event, Delta):
                chunk = writer.chunk(event)
                if chunk is not None:
                    yield sse(chunk)
            elif isinstance(event, Finished):
                job.ended = True
                if include_usage:
                    yield sse(writer.usage_chunk(event.outputs))
                break
            elif isinstance(event, Failed):
                job.ended = True
                yield sse(event.error().body())
                break
    except Exception:  # writing a chunk failed: this stream alone ends, with an error chunk
        log.exception("could not write a stream chunk")
        _release(state, job)
        yield sse(internal_error("The server failed while streaming this response; see its log.").body())
    yield sse("[DONE]")


def _release(state: ServerState, job: Job) -> None:
    """Give back the job's place in the queue; cancel it in the engine if it has not ended (idempotent)."""
    if job.released:
        return
    job.released = True
    state.pending -= len(job.work)
    if not job.ended:
        state.engine_loop.abort(job)


class _EventStream(StreamingResponse):
    """A server-sent-event stream that always releases its job, however the connection ends."""

    def __init__(self, content, release, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._on_close = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()

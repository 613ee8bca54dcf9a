"""The OpenAI-compatible FastAPI app: routes, errors, and how a request's job is run and answered."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from nextok.server.engine_loop import Delta, EngineLoop, Failed, Finished, Job
from nextok.server.errors import ApiError
from nextok.server.guard import GuardMiddleware
from nextok.server.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                    CompletionResponse, ErrorResponse, Health, ModelCard, ModelList)
from nextok.server.responses import ResponseWriter, sse
from nextok.server.settings import ServerSettings
from nextok.server.translate import ServedModel, Work, chat_work, check_model, completion_work

log = logging.getLogger("nextok.server")

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 422, 429)}
_GENERATION_ERRORS = {**_ERRORS, 500: {"model": ErrorResponse, "description": "the engine failed"}}


@dataclass
class ServerState:
    """What the routes share; `pending` is only touched on the event loop."""

    llm: object
    model: ServedModel
    settings: ServerSettings
    engine_loop: EngineLoop | None = None
    pending: int = 0  # engine requests submitted and not yet released
    started: int = 0


def build_app(llm, settings: ServerSettings | None = None) -> FastAPI:
    """The app serving `llm`; its lifespan starts and stops the engine thread."""
    settings = settings or ServerSettings()
    state = ServerState(llm=llm, model=ServedModel.from_llm(llm, settings.served_model_name), settings=settings,
                        started=int(time.time()))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine_loop = EngineLoop(llm.engine)
        state.engine_loop.start()
        try:
            yield
        finally:
            await asyncio.to_thread(state.engine_loop.stop)

    app = FastAPI(title="nextok", summary="OpenAI-compatible text generation with nextok's decoding",
                  version="1", lifespan=lifespan)
    app.state.nextok = state
    app.add_middleware(GuardMiddleware, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes)
    _add_error_handlers(app)
    auth = [Security(HTTPBearer(auto_error=False))] if settings.api_key else []  # checked by GuardMiddleware

    @app.get("/health", response_model=Health)
    async def health() -> dict:
        loop = state.engine_loop
        blocks = llm.engine.blocks
        return {"status": "ok", "model": state.model.name, "pending_requests": state.pending,
                "kv_blocks_used": blocks.num_used, "kv_blocks_total": blocks.num_blocks,
                "steps": loop.steps if loop else 0, "peak_batch": loop.peak_batch if loop else 0}

    @app.get("/v1/models", response_model=ModelList, dependencies=auth, responses=_ERRORS)
    async def models() -> dict:
        return {"object": "list", "data": [_card(state)]}

    @app.get("/v1/models/{model_id}", response_model=ModelCard, dependencies=auth, responses=_ERRORS)
    async def model(model_id: str) -> dict:
        check_model(model_id, state.model)
        return _card(state)

    @app.post("/v1/completions", response_model=None, dependencies=auth,
              responses={200: {"model": CompletionResponse, "content": {"text/event-stream": {}}},
                         **_GENERATION_ERRORS})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        work = completion_work(body, state.model, settings)
        writer = ResponseWriter(state.model.name, state.model.tokenizer, body.n or 1, chat=False,
                                logprobs=body.logprobs is not None)
        return await _answer(state, request, work, writer, bool(body.stream), _include_usage(body))

    @app.post("/v1/chat/completions", response_model=None, dependencies=auth,
              responses={200: {"model": ChatCompletionResponse, "content": {"text/event-stream": {}}},
                         **_GENERATION_ERRORS})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        work = chat_work(body, state.model, settings)
        writer = ResponseWriter(state.model.name, state.model.tokenizer, body.n or 1, chat=True,
                                logprobs=bool(body.logprobs))
        return await _answer(state, request, work, writer, bool(body.stream), _include_usage(body))

    return app


def _card(state: ServerState) -> dict:
    return {"id": state.model.name, "object": "model", "created": state.started, "owned_by": "nextok",
            "max_model_len": state.model.max_model_len}


def _include_usage(body) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


# ---------------------------------------------------------------------- running a job
async def _answer(state: ServerState, request: Request, work: list[Work], writer: ResponseWriter, stream: bool,
                  include_usage: bool) -> Response:
    job = await _submit(state, work, stream)
    if not stream:
        event = await _wait_for_end(state, job, request)
        if event is None:  # the client left; nobody reads this
            return Response(status_code=204)
        return JSONResponse(writer.response(event.outputs))
    return _EventStream(_events(state, job, writer, include_usage), release=lambda: _release(state, job),
                        media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _submit(state: ServerState, work: list[Work], stream: bool) -> Job:
    settings = state.settings
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
        raise ApiError(500, first.message, type="server_error", code="internal_error") if first.internal \
            else ApiError(400, first.message)
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
                raise ApiError(500, event.message, type="server_error", code="internal_error")
    finally:
        gone.cancel()
        _release(state, job)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _events(state: ServerState, job: Job, writer: ResponseWriter, include_usage: bool) -> AsyncIterator[str]:
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
            yield sse({"error": {"message": event.message, "type": "server_error", "param": None,
                                 "code": "internal_error"}})
            break
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


# ---------------------------------------------------------------------- errors
def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return api_error_response(validation_error(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = f"{e.detail}: {request.method} {request.url.path}"
        return JSONResponse(ApiError(e.status_code, message).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return api_error_response(ApiError(500, "The server failed on this request; see its log.",
                                           type="server_error", code="internal_error"))


def api_error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def validation_error(errors: list[dict]) -> ApiError:
    """pydantic's errors as one OpenAI error: bad JSON is a 400, a body that breaks the schema a 422."""
    for error in errors:
        if error.get("type") == "json_invalid":
            detail = error.get("ctx", {}).get("error", "")
            return ApiError(400, f"We could not parse the JSON body of your request ({detail}).", code="invalid_json")
    parts, params = [], []
    for error in errors[:3]:
        loc = [str(x) for x in error.get("loc", ()) if x != "body"]
        params.append(".".join(loc) or None)
        parts.append(f"{'.'.join(loc) or 'body'}: {error.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return ApiError(422, "Invalid request: " + "; ".join(parts) + more, param=params[0] if params else None,
                    code="invalid_value")

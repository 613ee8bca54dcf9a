"""The OpenAI-compatible FastAPI app: its routes (answer.py runs and answers a request's job; errors.py makes
every error an OpenAI error object)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Security
from fastapi.responses import Response
from fastapi.security import HTTPBearer

from nextok.server.answer import ServerState, answer
from nextok.server.engine_loop import EngineLoop
from nextok.server.errors import add_error_handlers
from nextok.server.guard import GuardMiddleware
from nextok.server.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                    CompletionResponse, ErrorResponse, Health, ModelCard, ModelList)
from nextok.server.responses import ResponseWriter
from nextok.server.settings import ServerSettings
from nextok.server.translate import ServedModel, chat_work, check_model, completion_work

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 408, 413, 422, 429)}
_GENERATION_ERRORS = {**_ERRORS, 415: {"model": ErrorResponse},
                      500: {"model": ErrorResponse, "description": "the server failed on the request"},
                      503: {"model": ErrorResponse, "description": "the server is shutting down"}}


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
    app.add_middleware(GuardMiddleware, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes,
                       body_timeout=settings.body_timeout)
    add_error_handlers(app)
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
        return await answer(state, request, work, writer, bool(body.stream), _include_usage(body))

    @app.post("/v1/chat/completions", response_model=None, dependencies=auth,
              responses={200: {"model": ChatCompletionResponse, "content": {"text/event-stream": {}}},
                         **_GENERATION_ERRORS})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        work = chat_work(body, state.model, settings)
        writer = ResponseWriter(state.model.name, state.model.tokenizer, body.n or 1, chat=True,
                                logprobs=bool(body.logprobs))
        return await answer(state, request, work, writer, bool(body.stream), _include_usage(body))

    return app


def _card(state: ServerState) -> dict:
    return {"id": state.model.name, "object": "model", "created": state.started, "owned_by": "nextok",
            "max_model_len": state.model.max_model_len}


def _include_usage(body) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage

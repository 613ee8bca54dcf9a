"""GuardMiddleware: the API key, the body-size limit and the body's time limit, checked before a request
reaches the app."""

from __future__ import annotations

import asyncio
import hmac
import json

from nextok.server.errors import ApiError


DRAIN_BYTES = 64 << 20  # of a refused body, read and dropped before the 413 ...
DRAIN_SECONDS = 5.0  # ... or for this long at most


class GuardMiddleware:
    """ASGI middleware: 401 without the right `Authorization: Bearer KEY` on /v1 routes; 413 for a body
    over max_body_bytes (told by Content-Length, or counted while a chunked body arrives); 408 for a body
    that has not all arrived body_timeout seconds after the headers (a client that sent half and stopped)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, body_timeout: float | None = None) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"].startswith("/v1"):
            error = self._check_key(headers.get(b"authorization"))
            if error is not None:
                await _send_error(send, error)
                return
        length = headers.get(b"content-length")
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                await _send_error(send, ApiError(400, "The Content-Length header is not a number."))
                return
            if size > self.max_body_bytes:
                await self._discard_body(receive)
                await _send_error(send, self._too_large(size))
                return
        if scope["method"] in ("POST", "PUT", "PATCH"):
            body, error = await self._read_body(receive)
            if error is not None:
                await _send_error(send, error)
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    def _check_key(self, header: bytes | None) -> ApiError | None:
        if not header:
            return ApiError(401, "You didn't provide an API key: send it as 'Authorization: Bearer KEY'.",
                            code="invalid_api_key")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
            return ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        return None

    def _too_large(self, size: int | None) -> ApiError:
        told = f" ({size} bytes)" if size is not None else ""
        return ApiError(413, f"The request body{told} is over this server's limit of {self.max_body_bytes} bytes.",
                        code="request_too_large")

    async def _discard_body(self, receive) -> None:
        """Read and drop what a client sends of a body that will be refused, up to DRAIN_BYTES or
        DRAIN_SECONDS: a client writes its whole body before it reads the answer, and closing while
        it still writes would reset its connection instead of giving it the 413."""
        received = 0

        async def drain() -> None:
            nonlocal received
            while received < DRAIN_BYTES:
                message = await receive()
                received += len(message.get("body", b""))
                if message["type"] == "http.disconnect" or not message.get("more_body", False):
                    return

        try:
            await asyncio.wait_for(drain(), DRAIN_SECONDS)
        except asyncio.TimeoutError:
            pass

    async def _read_body(self, receive) -> tuple[bytes, ApiError | None]:
        try:
            return await asyncio.wait_for(self._read_chunks(receive), self.body_timeout)
        except asyncio.TimeoutError:
            return b"", ApiError(408, f"The request body did not arrive within {self.body_timeout:g} s; send it "
                                      "whole, and make Content-Length match its size.", code="request_timeout")

    async def _read_chunks(self, receive) -> tuple[bytes, ApiError | None]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", ApiError(400, "The client disconnected while sending the body.")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                if message.get("more_body", False):
                    await self._discard_body(receive)
                return b"", self._too_large(None)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # afterwards: the disconnect, when it comes

    return replayed


async def _send_error(send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    if error.status in (408, 413):
        headers.append((b"connection", b"close"))  # the rest of the body is not read
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

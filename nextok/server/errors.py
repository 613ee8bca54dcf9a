"""ApiError: a problem with a request, answered as an OpenAI-style error object; and the app's
exception handlers, so that every error the app gives is one."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("nextok.server")


class ApiError(Exception):
    """An error the client caused (or a limit it hit): status, message, and the OpenAI type/param/code."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def internal_error(message: str = "The server failed on this request; see its log.") -> ApiError:
    return ApiError(500, message, type="server_error", code="internal_error")


def add_error_handlers(app: FastAPI) -> None:
    """Every error the app answers becomes an OpenAI error object, whatever raised it."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return api_error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        if any(tuple(error.get("loc", ())) == ("body",) and isinstance(error.get("input"), (bytes, bytearray))
               for error in e.errors()):  # a body FastAPI did not parse: it was not sent as JSON
            told = request.headers.get("content-type")
            return api_error_response(ApiError(
                415, f"The request body must be JSON sent with 'Content-Type: application/json' (got "
                     f"{repr(told) if told else 'no Content-Type'}).", code="unsupported_media_type"))
        return api_error_response(validation_error(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = f"{e.detail}: {request.method} {request.url.path}"
        return SafeJSONResponse(ApiError(e.status_code, message).body(), status_code=e.status_code,
                                headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return api_error_response(internal_error())


def api_error_response(e: ApiError) -> JSONResponse:
    return SafeJSONResponse(e.body(), status_code=e.status, headers=e.headers)


class SafeJSONResponse(JSONResponse):
    """JSON that always encodes: a lone surrogate, should one reach a body, is written as its JSON escape
    (backslashreplace gives exactly `\\udXXX`) instead of failing the response with a 500."""

    def render(self, content: Any) -> bytes:
        return json_bytes(content)


def json_bytes(content: Any) -> bytes:
    text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.encode("utf-8", "backslashreplace")


def validation_error(errors: list[dict]) -> ApiError:
    """pydantic's errors as one OpenAI error: bad JSON or text that is not Unicode is a 400, a body that
    breaks the schema a 422."""
    for error in errors:
        if error.get("type") == "json_invalid":
            detail = error.get("ctx", {}).get("error", "")
            return ApiError(400, f"We could not parse the JSON body of your request ({detail}).", code="invalid_json")
        if error.get("type") == "invalid_unicode":
            return ApiError(400, f"{error['msg']}.", param=error.get("ctx", {}).get("param"), code="invalid_unicode")
    parts, params = [], []
    for error in errors:
        loc = ".".join(str(x) for x in error.get("loc", ()) if x != "body" and not _union_member(x))
        part = f"{loc or 'body'}: {error.get('msg', 'invalid')}"
        if part not in parts:
            parts.append(part)
            params.append(loc or None)
    more = f" (and {len(parts) - 3} more)" if len(parts) > 3 else ""
    return ApiError(422, "Invalid request: " + "; ".join(parts[:3]) + more, param=params[0] if params else None,
                    code="invalid_value")


def _union_member(part: object) -> bool:
    """pydantic names the member of a union a value failed in its location (`stop.list[constrained-str]`);
    the client's field is the part before it."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part
                                      or part.startswith(("constrained-", "function-")))

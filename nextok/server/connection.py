"""NextokH11Protocol: uvicorn's h11 HTTP/1.1 protocol with nextok's rules at the connection's edge.

uvicorn (0.55) holds a fresh connection open forever until its first request arrives, and a client
that trickles bytes after a response keeps cancelling its keep-alive timer; it also answers a
malformed request in plain text. This protocol adds:
- a header timeout: a request's headers must all arrive within `header_timeout` seconds of connecting
  or of the previous response; then the connection is closed (with a 408 where half of them came);
- OpenAI error objects for what uvicorn answers itself: a malformed request line or header, a bad
  Content-Length, headers over the size limit (431), instead of text/plain.
"""

from __future__ import annotations

import asyncio
import json
import re

import h11
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol


class _Connection(h11.Connection):
    """h11's connection, keeping the last error in what the client sent so the answer can name it."""

    last_error: h11.RemoteProtocolError | None = None

    def next_event(self):
        try:
            return super().next_event()
        except h11.RemoteProtocolError as e:
            self.last_error = e
            raise


class NextokH11Protocol(H11Protocol):
    """uvicorn's H11Protocol with a header timeout (config.header_timeout, seconds; None: none) and JSON
    error answers. `uvicorn_config` in run.py selects it."""

    def __init__(self, config, server_state, app_state, _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.conn = _Connection(h11.SERVER, config.h11_max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE)
        self.header_timeout: float | None = getattr(config, "header_timeout", None)
        self._header_timer: asyncio.TimerHandle | None = None
        self._cycle_waited = None  # the request cycle that was current when the timer started

    # ------------------------------------------------------------------ the header timeout
    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self._header_timer is not None and self.cycle is not self._cycle_waited:
            self._stop_header_timer()  # a new request's headers are in: the app's limits take over

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._await_request()  # before uvicorn handles a pipelined request, which stops it again
        super().on_response_complete()

    def _await_request(self) -> None:
        self._stop_header_timer()
        if self.header_timeout is not None:
            self._cycle_waited = self.cycle
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_timed_out)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        received, _ = self.conn.trailing_data
        if received and self.conn.our_state is h11.IDLE:
            self._send_error(408, f"The request headers did not all arrive within {self.header_timeout:g} s of "
                                  "connecting (or of the previous response); send the whole request at once.",
                             "request_timeout")
        else:  # nothing of a new request came: close quietly, as the keep-alive timeout does
            self._close()

    # ------------------------------------------------------------------ malformed requests
    def send_400_response(self, msg: str) -> None:
        error = self.conn.last_error
        status = error.error_status_hint if error is not None else 400
        if status == 431:
            limit = self.config.h11_max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
            message = f"The request headers are over this server's limit of {limit} bytes; send smaller ones."
            code = "request_header_fields_too_large"
        else:
            detail = _detail(error)
            message = f"Invalid HTTP request{f' ({detail})' if detail else ''}: send a well-formed HTTP/1.1 request."
            code = "invalid_http_request"
        self._send_error(status, message, code)

    def _send_error(self, status: int, message: str, code: str) -> None:
        """Answer with an OpenAI error object and close the connection."""
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": code}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        try:
            output = [self.conn.send(h11.Response(status_code=status, headers=headers,
                                                  reason=STATUS_PHRASES.get(status, b""))),
                      self.conn.send(h11.Data(data=body)), self.conn.send(h11.EndOfMessage())]
            self.transport.write(b"".join(part for part in output if part))
        except h11.LocalProtocolError:  # a response had already begun on this connection: it can only close
            pass
        self._close()

    def _close(self) -> None:
        try:
            self.conn.send(h11.ConnectionClosed())
        except h11.LocalProtocolError:  # h11 is in its error state: the transport still closes
            pass
        self.transport.close()


def _detail(error: Exception | None, limit: int = 160) -> str:
    """h11's reason, with what it quotes of the request shortened: `illegal header line: b'X y'`."""
    if error is None:
        return ""
    text = re.sub(r"bytearray\((b['\"].*?['\"])\)", r"\1", str(error))
    return text if len(text) <= limit else text[:limit] + "..."

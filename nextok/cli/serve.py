"""`nextok serve`: the OpenAI-compatible server on uvicorn; SIGTERM drains in-flight requests, then exits."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from nextok.cli.common import add_model_flags, load_llm


def register_serve_command(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="serve the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models)",
                           description="An OpenAI-compatible HTTP server; existing OpenAI clients work unchanged.")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--api-key", default=os.environ.get("NEXTOK_API_KEY"),
                       help="require 'Authorization: Bearer KEY' (default: $NEXTOK_API_KEY, else no key)")
    serve.add_argument("--served-model-name", help="the model id clients send (default: the model's name)")
    serve.add_argument("--max-queue", type=int, default=256,
                       help="requests in flight at most; more get 429 with Retry-After (default: 256)")
    serve.add_argument("--request-timeout", type=float, default=600.0,
                       help="seconds a request may run; then it ends with what it has, finish_reason 'timeout' "
                            "(default: 600)")
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default: 1 MiB)")
    serve.add_argument("--max-n", type=int, default=16, help="largest n and num_beams (default: 16)")
    serve.add_argument("--max-tokens-limit", type=int, default=None, help="largest max_tokens (default: the context)")
    serve.add_argument("--drain-timeout", type=float, default=30.0,
                       help="on SIGTERM, seconds to let in-flight requests finish; then each still running ends "
                            "with an error (a stream: an error chunk and [DONE]) (default: 30)")
    serve.add_argument("--header-timeout", type=float, default=10.0,
                       help="seconds a connection may take to send a request's headers, from connecting or from "
                            "the previous response; then it is closed (default: 10)")
    serve.add_argument("--body-timeout", type=float, default=30.0,
                       help="seconds a request may take to send its whole body after its headers; then 408 "
                            "(default: 30)")
    serve.add_argument("--keep-alive-timeout", type=float, default=5.0,
                       help="seconds an idle keep-alive connection stays open between requests (default: 5)")
    serve.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    add_model_flags(serve)
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from nextok.server.app import build_app
    from nextok.server.run import NextokServer, uvicorn_config
    from nextok.server.settings import ServerSettings

    settings = ServerSettings(api_key=args.api_key, served_model_name=args.served_model_name,
                              max_queue=args.max_queue, request_timeout=args.request_timeout,
                              max_body_bytes=args.max_body_bytes, max_n=args.max_n,
                              max_tokens_limit=args.max_tokens_limit, drain_timeout=args.drain_timeout,
                              header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                              keep_alive_timeout=args.keep_alive_timeout)
    llm = load_llm(args)
    app = build_app(llm, settings)
    server = NextokServer(uvicorn_config(app, settings, host=args.host, port=args.port, log_level=args.log_level))
    print(f"nextok: serving {app.state.nextok.model.name} on http://{args.host}:{args.port}/v1", file=sys.stderr,
          flush=True)
    # uvicorn drains on SIGTERM and then raises the signal again to exit by it; a drained server
    # has done its job, so that second SIGTERM is ignored and the exit status is 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    return 0 if server.started else 1

"""The decoding view: `LLM.trace` records how each token was chosen; `nextok explain` shows it.

trace.py     Trace and its parts: plain dataclasses, JSON-serialisable
recorder.py  trace_request: runs one request on the real engine and records every step
stages.py    the distribution after each processor, in the engine's order
page.py      render_page: the self-contained HTML page (page.html, page.css, page.js, beam.js)
command.py   the `nextok explain` subcommand
"""

from nextok.explain.page import render_page
from nextok.explain.trace import Trace

__all__ = ["Trace", "render_page"]

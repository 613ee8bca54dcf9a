"""`nextok explain`: trace one prompt under one or more strategies and write the page (or JSON)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from nextok.cli.common import add_model_flags, add_sampling_flags, load_llm, sampling_params_from_args
from nextok.params import SamplingParams

_SPEC_HELP = ("comma-separated strategies to show side by side, each a '+'-joined list of: greedy, sample, "
              "beamN, topkN, toppX, minpX, tempX (e.g. greedy,beam4,topk50,topp0.92,topk40+temp0.7)")

# One part of a --compare strategy -> the SamplingParams fields it sets.
_PARTS: list[tuple[str, type | None, Callable[[object], dict]]] = [
    (r"greedy", None, lambda v: {"do_sample": False, "num_beams": 1}),
    (r"sample", None, lambda v: {"do_sample": True}),
    (r"beam(\d+)", int, lambda v: {"num_beams": v}),
    (r"topk(\d+)", int, lambda v: {"do_sample": True, "top_k": v}),
    # Nucleus sampling as in the classic comparisons: top-p alone, top-k off.
    (r"topp([0-9.]+)", float, lambda v: {"do_sample": True, "top_p": v, "top_k": 0}),
    (r"minp([0-9.]+)", float, lambda v: {"do_sample": True, "min_p": v, "top_k": 0}),
    (r"temp([0-9.]+)", float, lambda v: {"do_sample": True, "temperature": v}),
]


def parse_strategy(spec: str, base: SamplingParams) -> SamplingParams:
    """One --compare entry ("beam4", "topk40+temp0.7") applied on top of the flags' params."""
    changes: dict = {}
    for part in spec.strip().lower().split("+"):
        fields = _part_fields(part)
        if fields is None:
            raise ValueError(f"--compare strategy {spec!r} is not understood: {_SPEC_HELP}")
        changes.update(fields)
    return base.replace(**changes)


def _part_fields(part: str) -> dict | None:
    for pattern, kind, fields in _PARTS:
        match = re.fullmatch(pattern, part)
        if match:
            try:
                return fields(kind(match.group(1)) if kind else None)
            except ValueError:  # "topp0.9.2"
                return None
    return None


def parse_compare(text: str, base: SamplingParams) -> list[tuple[str, SamplingParams]]:
    specs = [s.strip() for s in text.split(",") if s.strip()]
    if not specs:
        raise ValueError(f"--compare is empty: {_SPEC_HELP}")
    return [(spec, parse_strategy(spec, base)) for spec in specs]


def register_explain_command(sub: argparse._SubParsersAction) -> None:
    """Add `nextok explain` to the CLI's subcommands."""
    cmd = sub.add_parser(
        "explain", help="write an HTML page that shows how each token was chosen",
        description="Trace one prompt and write a self-contained HTML page: the text coloured by probability, "
                    "each step's candidates with the top-k / top-p cuts, and the beam tree for beam search.")
    cmd.add_argument("prompt", help="the prompt")
    cmd.add_argument("-o", "--output", help="where to write the page (default: explain.html; with --json: stdout)")
    cmd.add_argument("--compare", metavar="STRATEGIES", help=_SPEC_HELP)
    cmd.add_argument("--json", action="store_true", help="write the trace(s) as JSON instead of the page")
    cmd.add_argument("--top", type=int, default=20, help="candidates recorded per step (default: 20)")
    add_model_flags(cmd)
    add_sampling_flags(cmd)
    cmd.set_defaults(func=run_explain)


def run_explain(args: argparse.Namespace) -> int:
    from nextok.explain.page import render_page

    if args.top < 1:
        raise ValueError(f"--top {args.top} is invalid: give at least 1")
    base = sampling_params_from_args(args)
    strategies = parse_compare(args.compare, base) if args.compare else [("", base)]
    llm = load_llm(args)
    traces = []
    for _, params in strategies:
        trace = llm.trace(args.prompt, params, top=args.top)
        trace.label = _label(params)
        traces.append(trace)
    if args.json:
        records = [t.to_dict() for t in traces]
        text = json.dumps(records if args.compare else records[0], ensure_ascii=False, allow_nan=False)
        if args.output:
            Path(args.output).write_text(text + "\n", encoding="utf-8")
        else:
            print(text)
        return 0
    path = Path(args.output or "explain.html")
    path.write_text(render_page(traces), encoding="utf-8")
    steps = max(len(t.token_ids) for t in traces)
    print(f"wrote {path} ({len(traces)} strateg{'ies' if len(traces) > 1 else 'y'}, up to {steps} tokens)",
          file=sys.stderr)
    return 0


def _label(p: SamplingParams) -> str:
    if p.num_beams > 1:
        return f"beam search, {p.num_beams} beams" + (" (sampled)" if p.do_sample else "")
    if not p.do_sample:
        return "greedy"
    parts = ["sampling"]
    if p.temperature != 1.0:
        parts.append(f"temperature {p.temperature}")
    if p.uses_top_k:
        parts.append(f"top-k {p.top_k}")
    if p.top_p < 1.0:
        parts.append(f"top-p {p.top_p}")
    if p.uses_min_p:
        parts.append(f"min-p {p.min_p}")
    return ", ".join(parts)

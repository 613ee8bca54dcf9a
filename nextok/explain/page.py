"""The explain page: one self-contained HTML file (inline CSS and JS, the traces as JSON, no network).

The template and its assets sit beside this module (page.html, page.css, page.js, beam.js). The
traces are embedded in a compact form: candidates as arrays, probabilities to 4 significant digits.
"""

from __future__ import annotations

import html
import json
from importlib import resources
from typing import Any

from nextok.explain.trace import BeamTrace, Trace

_STATUS = {"kept": 0, "finished": 1, "pruned": 2}


def render_page(traces: list[Trace], title: str | None = None) -> str:
    """The HTML page for one or more traces of the same prompt (shown side by side)."""
    if not traces:
        raise ValueError("render_page needs at least one trace")
    data = page_data(traces)
    prompt = traces[0].prompt or ""
    files = resources.files("nextok.explain")
    template = files.joinpath("page.html").read_text(encoding="utf-8")
    parts = {
        "__TITLE__": html.escape(title or f"nextok explain: {prompt[:60]}"),
        "__PROMPT__": html.escape(prompt),
        "__CSS__": files.joinpath("page.css").read_text(encoding="utf-8"),
        "__JS__": "".join(files.joinpath(name).read_text(encoding="utf-8") for name in ("page.js", "beam.js")),
        "__DATA__": _script_json(data),
    }
    for key, value in parts.items():  # each placeholder once; the data goes last so it is never rescanned
        head, sep, tail = template.partition(key)
        if not sep:
            raise RuntimeError(f"page.html lacks the placeholder {key}")
        template = head + value + tail
    return template


def page_data(traces: list[Trace]) -> dict[str, Any]:
    """What the page's script reads: the shared vocabulary and one compact record per trace."""
    vocab: dict[int, str] = {}
    for t in traces:
        vocab.update(t.vocab)
    return {"prompt": traces[0].prompt, "vocab": {str(k): v for k, v in vocab.items()},
            "traces": [_compact(t) for t in traces]}


def _script_json(data: Any) -> str:
    """JSON that is safe inside <script>: no "</script>", "<!--" or line separators can appear."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _p(x: float) -> float:
    return float(f"{x:.4g}")


def _s(x: float) -> float:
    return round(x, 4)


def _compact(t: Trace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "label": t.label or t.strategy, "strategy": t.strategy, "stages": t.stages, "seed": t.seed, "top": t.top,
        "params": {k: t.params[k] for k in ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p",
                                            "typical_p", "num_beams", "length_penalty", "early_stopping",
                                            "repetition_penalty", "no_repeat_ngram_size")},
        "outputs": [{"tokens": c.token_ids, "text": c.text, "finish_reason": c.finish_reason, "score": c.score}
                    for c in t.outputs],
    }
    if t.beam is not None:
        out["beam"] = _compact_beam(t.beam)
    else:
        steps = t.samples[0].steps if t.samples else []
        out["steps"] = [[s.token, s.reason, [[c.token, *map(_p, c.probs)] for c in s.candidates],
                         [_p(r) for r in s.rest], s.kept] for s in steps]
    return out


def _compact_beam(beam: BeamTrace) -> dict[str, Any]:
    steps = []
    for step in beam.steps:
        nodes = []
        for n in step.beams:
            cands = [[c.token, _STATUS[c.status], -1 if c.rank is None else c.rank, -1 if c.child is None else c.child,
                      _s(c.logprob), _s(c.score), *map(_p, c.probs)] for c in n.candidates]
            nodes.append([n.parent, n.token, _s(n.score), cands, [_p(r) for r in n.rest], n.kept])
        steps.append(nodes)
    hyps = [[h.step, h.beam, h.token, _s(h.score), h.final] for h in beam.hypotheses]
    return {"nb": beam.num_beams, "k": beam.beams_to_keep, "steps": steps, "hyps": hyps}

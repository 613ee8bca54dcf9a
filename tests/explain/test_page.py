"""The explain page and `nextok explain`: self-contained HTML, the CLI, and a real headless browser."""

from __future__ import annotations

import html
import json
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from nextok import SamplingParams
from nextok.cli import main
from nextok.cli.explain import parse_compare
from nextok.explain.page import page_data, render_page
from nextok.explain.trace import (
    BeamCandidate,
    BeamNode,
    BeamStep,
    BeamTrace,
    Candidate,
    Hypothesis,
    SampleTrace,
    TokenStep,
    Trace,
)
from nextok.outputs import Completion

PROMPT = "I enjoy walking with my cute dog"
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "explain"


@pytest.fixture(scope="module")
def traces(tiny_llm) -> list[Trace]:
    out = []
    for label, params in [
        ("greedy", SamplingParams(max_new_tokens=8)),
        ("beam4", SamplingParams(max_new_tokens=8, num_beams=4, early_stopping=True)),
        ("topp0.92", SamplingParams(max_new_tokens=8, do_sample=True, top_k=0, top_p=0.92, seed=0)),
    ]:
        trace = tiny_llm.trace(PROMPT, params)
        trace.label = label
        out.append(trace)
    return out


def _embedded(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="trace-data">(.*?)</script>', page, re.S)
    return json.loads(match.group(1))


def test_page_is_self_contained_and_embeds_the_traces(traces):
    page = render_page(traces)
    assert _embedded(page) == json.loads(json.dumps(page_data(traces)))
    assert not re.search(r"""\s(src|href)\s*=|@import|url\(|fetch\(|XMLHttpRequest""", page)
    assert "default-src 'none'" in page  # the browser may not fetch anything
    assert page.count("<script") == 2 and "__DATA__" not in page and "__JS__" not in page


def test_page_survives_hostile_text(traces):
    trace = traces[0]
    hostile = Trace(**{**trace.__dict__, "prompt": "</script><script>alert(1)</script> <!-- \u2028",
                       "vocab": {**trace.vocab, trace.token_ids[0]: "</script>"}})
    page = render_page([hostile])
    assert page.count("</script>") == 2  # the JSON block's and the code's
    assert _embedded(page)["prompt"] == hostile.prompt


def test_parse_compare():
    base = SamplingParams(max_new_tokens=7, seed=3)
    parsed = dict(parse_compare("greedy, beam4,topk50,topp0.92,topk40+temp0.7", base))
    assert parsed["greedy"] == base
    assert parsed["beam4"].num_beams == 4 and not parsed["beam4"].do_sample
    assert parsed["topk50"].do_sample and parsed["topk50"].top_k == 50 and parsed["topk50"].top_p == 1.0
    assert parsed["topp0.92"].top_p == 0.92 and parsed["topp0.92"].top_k == 0
    assert parsed["topk40+temp0.7"].temperature == 0.7 and parsed["topk40+temp0.7"].max_new_tokens == 7
    for bad in ("beam", "nucleus", "topp0.9.2", ""):
        with pytest.raises(ValueError, match="--compare"):
            parse_compare(bad, base)
    with pytest.raises(ValueError, match="top_p"):
        parse_compare("topp1.5", base)


def test_cli_writes_the_page_and_json(tiny_llm, tiny_model_dir, tmp_path, capsys):
    flags = ["--model", str(tiny_model_dir), "--dtype", "float32", "--kv-cache-gb", "0.05", "--max-new-tokens", "5",
             "--seed", "1"]
    out = tmp_path / "page.html"
    assert main(["explain", PROMPT, *flags, "--compare", "greedy,beam3", "-o", str(out)]) == 0
    assert _embedded(out.read_text())["traces"][1]["beam"]["nb"] == 3
    capsys.readouterr()
    assert main(["explain", PROMPT, *flags, "--do-sample", "--top-k", "20", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    expected = tiny_llm.generate(PROMPT, SamplingParams(max_new_tokens=5, seed=1, do_sample=True, top_k=20))
    assert record["outputs"][0]["token_ids"] == expected[0].outputs[0].token_ids
    assert record["stages"] == ["model", "top_k"] and record["samples"][0]["steps"]
    assert main(["explain", PROMPT, *flags, "--compare", "beam"]) == 2


# ---------------------------------------------------------------------- headless Chromium
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(tmp_path: Path, page: Path, *args: str) -> str:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
               "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp_path / 'chromium-profile'}", *args,
               page.resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if "CONSOLE" in line and "Uncaught" in line]
    assert not errors, errors
    return done.stdout


# Runs after the page's script: clicks and keys as a person would, then reports what the page shows.
_INTERACT = """<script>
(function () {
  var P = window.nextokPanels, out = {}, g = P[0], b = P[1];
  function head(p) { return p.detail.querySelector(".head").textContent; }
  g.spans[3].click();
  out.clicked = head(g);
  out.chosenRow = g.detail.querySelector("tr.chosen .tk").textContent;
  g.spans[3].dispatchEvent(new KeyboardEvent("keydown", {key: "ArrowRight", bubbles: true}));
  out.afterArrow = g.current;
  g.spans[g.current].dispatchEvent(new KeyboardEvent("keydown", {key: "End", bubbles: true}));
  out.afterEnd = g.current;
  var r = b.svg.getBoundingClientRect(), xy = b.xy(2, 1);
  b.svg.dispatchEvent(new MouseEvent("click", {clientX: r.left + xy[0], clientY: r.top + xy[1], bubbles: true}));
  out.node = b.sel;
  out.nodeHead = head(b);
  b.treeWrap.dispatchEvent(new KeyboardEvent("keydown", {key: "ArrowDown", bubbles: true}));
  b.treeWrap.dispatchEvent(new KeyboardEvent("keydown", {key: "ArrowRight", bubbles: true}));
  out.afterTreeKeys = b.sel;
  out.beamRows = b.detail.querySelectorAll("tbody tr").length;
  document.body.dataset.check = JSON.stringify(out);
})();
</script></body>"""


def _big_traces(steps: int = 400, beams: int = 8, top: int = 20) -> list[Trace]:
    """A synthetic greedy and beam trace of the size the page must stay light for: `steps` steps x `beams` beams."""
    rng = random.Random(0)
    stages = ["model"]
    trace_steps = []
    for t in range(steps):
        nodes = []
        for b in range(1 if t == 0 else beams):
            cands = [BeamCandidate(token=rng.randrange(1000), probs=[rng.random() / 5], logprob=-rng.random() * 5,
                                   score=-t - rng.random(), rank=None, status="pruned") for _ in range(top)]
            if t + 1 < steps:  # the prompt fans out into every beam; then each beam continues itself
                for i, child in enumerate(range(beams) if t == 0 else [b]):
                    cands[i].status, cands[i].child, cands[i].rank = "kept", child, child
            nodes.append(BeamNode(parent=-1 if t == 0 else b, token=None if t == 0 else rng.randrange(1000),
                                  score=-float(t), candidates=cands, rest=[0.1], kept=[1000]))
        trace_steps.append(BeamStep(beams=nodes))
    hyps = [Hypothesis(token_ids=[1] * steps, score=-1.0 - i, step=steps - 1, beam=i, token=2, final=True)
            for i in range(beams)]
    for node, h in zip(trace_steps[-1].beams, hyps):
        node.candidates[0].status, node.candidates[0].token = "finished", h.token
    beam = BeamTrace(num_beams=beams, beams_to_keep=2 * beams, steps=trace_steps, hypotheses=hyps)
    params = SamplingParams(max_new_tokens=steps, num_beams=beams).to_dict()
    vocab = {i: f"tok{i}" for i in range(1000)}
    outputs = [Completion(index=0, text="", token_ids=[1] * steps, finish_reason="length", score=-1.0)]
    big_beam = Trace(prompt=PROMPT, prompt_token_ids=[1], params=params, seed=0, strategy="beam search",
                     stages=stages, outputs=outputs, beam=beam, vocab=vocab, label="big beam")
    sample_steps = [TokenStep(token=1, reason="argmax", candidates=[Candidate(token=rng.randrange(1000), probs=[0.04])
                                                                    for _ in range(top)], rest=[0.2], kept=[1000])
                    for _ in range(steps)]
    big_greedy = Trace(prompt=PROMPT, prompt_token_ids=[1], params=SamplingParams(max_new_tokens=steps).to_dict(),
                       seed=0, strategy="greedy", stages=stages, outputs=outputs,
                       samples=[SampleTrace(index=0, steps=sample_steps)], vocab=vocab, label="big greedy")
    return [big_greedy, big_beam]


def _panels(dom: str) -> list[str]:
    return re.split(r'<section class="panel"', dom)[1:]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make install-test installs it)")
def test_page_in_headless_chromium(traces, tmp_path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = ARTIFACTS / "explain-tiny.html"
    page.write_text(render_page(traces), encoding="utf-8")
    interactive = ARTIFACTS / "explain-tiny-interact.html"
    interactive.write_text(render_page(traces).replace("</body>", _INTERACT), encoding="utf-8")
    dom = _chromium(tmp_path, interactive, "--dump-dom")
    assert 'data-ready="true"' in dom
    check = json.loads(html.unescape(re.search(r'data-check="([^"]*)"', dom).group(1)))
    steps = len(traces[0].samples[0].steps)
    assert check["clicked"].startswith("Step 4:") and check["afterArrow"] == 4 and check["afterEnd"] == steps - 1
    assert check["chosenRow"]
    assert check["node"] == [2, 1] and check["nodeHead"].startswith("Step 3, beam 2")
    assert check["afterTreeKeys"] == [3, 2] and check["beamRows"] > 5
    panels = _panels(dom)
    assert len(panels) == 3
    greedy, beam, topp = panels
    assert len(re.findall(r'class="tok"', greedy)) == len(traces[0].samples[0].steps)  # one node per step
    assert len(re.findall(r'class="tok"', topp)) == len(traces[2].samples[0].steps)
    assert len(re.findall(r'class="tok"', beam)) == len(traces[1].token_ids)
    tree = re.search(r'<svg class="beam-tree"[^>]*data-steps="(\d+)"', beam)
    assert tree and int(tree.group(1)) == len(traces[1].beam.steps)
    assert 'class="chunk"' in beam and "table class=\"cands\"" in greedy
    shot = ARTIFACTS / "explain-tiny.png"
    shot.unlink(missing_ok=True)
    _chromium(tmp_path, page, f"--screenshot={shot}", "--window-size=1280,900", "--hide-scrollbars")
    assert shot.stat().st_size > 20_000


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make install-test installs it)")
def test_large_page_opens_fast_and_renders_lazily(tmp_path):
    big = _big_traces()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = ARTIFACTS / "explain-large.html"
    page.write_text(render_page(big), encoding="utf-8")
    dom = _chromium(tmp_path, page, "--dump-dom", "--window-size=1280,900")
    init_ms = float(re.search(r'data-init-ms="([\d.]+)"', dom).group(1))
    assert init_ms < 1000, f"the page's script took {init_ms} ms"
    greedy, beam = _panels(dom)
    assert len(re.findall(r'class="tok"', greedy)) == 400
    assert len(re.findall(r'class="tok"', beam)) == 400
    chunks = len(re.findall(r'<g class="chunk"', beam))
    assert 1 <= chunks < 400 // 24  # only the columns in view are drawn

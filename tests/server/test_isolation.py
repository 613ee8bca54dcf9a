"""Nothing poisons the engine: a fault injected at each stage of one request (adding it to the engine, the
engine step, publishing its output, building its response) fails that request alone, with an OpenAI error
object (a stream: an error chunk and [DONE]); the requests running beside it get their normal answers, no
client waits, and the server answers as before afterwards."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from nextok import SamplingParams
from nextok.server import engine_loop as engine_loop_module
from nextok.server.responses import ResponseWriter
from tests.server.conftest import live_server
from tests.server.helpers import Result, call

MARK = 4242  # a request whose prompt starts with this token id is the one the faults hit
MARKED = [MARK, 310, 2000, 77]
NORMAL = ["The quick brown fox", "Once upon a time", "I enjoy walking with my cute dog", "Hello, my name is"]
TOKENS = 24
ANSWER_WITHIN_S = 10


@pytest.fixture(scope="module")
def iso_server(tiny_model_dir):
    with live_server(tiny_model_dir) as s:
        yield s


@pytest.fixture(scope="module")
def expected(tiny_llm) -> list[tuple[str, str]]:
    outputs = tiny_llm.generate(NORMAL, SamplingParams(max_new_tokens=TOKENS), use_tqdm=False)
    return [(o.outputs[0].text, o.outputs[0].finish_reason) for o in outputs]


def _marked(prompt_token_ids) -> bool:
    return len(prompt_token_ids) > 0 and prompt_token_ids[0] == MARK


def run_beside(server, faulty: dict, faulty_stream: bool) -> tuple[Result, list[Result]]:
    """The faulty request while the NORMAL ones run (half streamed); every answer within ANSWER_WITHIN_S."""
    started = time.monotonic()
    with ThreadPoolExecutor(len(NORMAL) + 1) as pool:
        normal = [pool.submit(call, server.url, {"prompt": p, "max_tokens": TOKENS, "temperature": 0}, i % 2 == 0)
                  for i, p in enumerate(NORMAL)]
        time.sleep(0.05)  # the normal requests are in the engine first
        bad = pool.submit(call, server.url, faulty, faulty_stream)
        results = [f.result(timeout=ANSWER_WITHIN_S) for f in normal]
        bad_result = bad.result(timeout=ANSWER_WITHIN_S)
    assert time.monotonic() - started < ANSWER_WITHIN_S
    return bad_result, results


def check_unaffected(server, results: list[Result], expected) -> None:
    for i, (result, (text, reason)) in enumerate(zip(results, expected)):
        assert result.status == 200 and result.error is None, result
        assert (result.text, result.finish_reason) == (text, reason), (NORMAL[i], result)
        if i % 2 == 0:
            assert result.done
    health = server.wait_idle(0)
    assert health["pending_requests"] == 0 and health["kv_blocks_used"] == 0
    after = call(server.url, {"prompt": NORMAL[0], "max_tokens": TOKENS, "temperature": 0})
    assert (after.text, after.finish_reason) == expected[0]


def check_failed(result: Result, stream_started: bool, status: int, code: str | None = "internal_error") -> None:
    if stream_started:  # the stream had begun: an error chunk, then [DONE]
        assert result.status == 200 and result.done, result
        assert result.error is not None and result.error["code"] == code, result
    else:
        assert result.status == status and result.error is not None, result
        assert result.error["code"] == code, result
    assert result.error["type"] == ("server_error" if status >= 500 else "invalid_request_error")


# ---------------------------------------------------------------------- adding the request
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("error, status", [(RuntimeError, 500), (ValueError, 400)])
def test_fault_while_adding(iso_server, expected, monkeypatch, stream, error, status):
    engine = iso_server.llm.engine
    real = engine.add_request

    def add_request(prompt_token_ids, params, **kwargs):
        if _marked(prompt_token_ids):
            raise error("injected fault while adding")
        return real(prompt_token_ids, params, **kwargs)

    monkeypatch.setattr(engine, "add_request", add_request)
    bad, results = run_beside(iso_server, {"prompt": MARKED, "max_tokens": 8, "temperature": 0}, stream)
    check_failed(bad, False, status, "internal_error" if status == 500 else None)
    assert "injected fault while adding" in bad.error["message"].lower()
    check_unaffected(iso_server, results, expected)


def test_fault_adding_the_second_prompt_leaves_nothing_behind(iso_server, expected, monkeypatch):
    engine = iso_server.llm.engine
    real = engine.add_request
    added = []

    def add_request(prompt_token_ids, params, **kwargs):
        if _marked(prompt_token_ids):
            raise RuntimeError("injected fault while adding")
        added.append(real(prompt_token_ids, params, **kwargs))
        return added[-1]

    monkeypatch.setattr(engine, "add_request", add_request)
    bad, results = run_beside(iso_server, {"prompt": [[310, 2000, 77], MARKED], "max_tokens": 8}, False)
    check_failed(bad, False, 500)
    first = [r for r in added if r.prompt_token_ids == [310, 2000, 77]]
    assert first and all(r.cancelled for r in first)  # the prompt that was added is taken back out
    check_unaffected(iso_server, results, expected)


# ---------------------------------------------------------------------- the engine step
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("beams", [1, 2])
def test_fault_in_the_engine_step(iso_server, expected, monkeypatch, stream, beams):
    runner = iso_server.llm.engine.runner
    real = runner.run

    def run(batch):
        if any(_marked(s.request.prompt_token_ids) for s in batch.seqs):
            raise RuntimeError("injected fault in the forward pass")
        return real(batch)

    monkeypatch.setattr(runner, "run", run)
    faulty = {"prompt": MARKED, "max_tokens": 8, "temperature": 0, "num_beams": beams}
    bad, results = run_beside(iso_server, faulty, stream)
    check_failed(bad, stream, 500)
    assert "injected fault in the forward pass" in bad.error["message"]
    check_unaffected(iso_server, results, expected)


def test_the_issue_request_beside_four_streams(iso_server, expected):
    """The issue's request (its length_penalty overflows the beam score) must not fail the streams beside it."""
    issue = {"prompt": "hi", "max_tokens": 2000, "num_beams": 2, "early_stopping": "never", "length_penalty": 100}
    started = time.monotonic()
    with ThreadPoolExecutor(5) as pool:
        streams = [pool.submit(call, iso_server.url, {"prompt": p, "max_tokens": TOKENS, "temperature": 0}, True)
                   for p in NORMAL]
        time.sleep(0.05)
        bad = pool.submit(call, iso_server.url, issue, True).result(timeout=60)
        results = [f.result(timeout=60) for f in streams]
    assert time.monotonic() - started < 60
    if bad.status == 200:  # refused by the engine mid-stream, or run to its end
        assert bad.done
        if bad.error is not None:
            assert bad.error["message"]
    else:  # refused before it started (SamplingParams validation): a 4xx naming the field
        assert bad.status == 400 and bad.error["param"] == "length_penalty", bad
    for result, (text, reason) in zip(results, expected):
        assert result.status == 200 and result.error is None and result.done, result
        assert (result.text, result.finish_reason) == (text, reason)
    assert iso_server.wait_idle(0)["kv_blocks_used"] == 0


# ---------------------------------------------------------------------- publishing the output
@pytest.mark.parametrize("stream", [False, True])
def test_fault_while_publishing(iso_server, expected, monkeypatch, stream):
    engine = iso_server.llm.engine
    real_output, real_end = engine.output, engine_loop_module.releasable_end

    def output(request):
        if _marked(request.prompt_token_ids):
            raise RuntimeError("injected fault while publishing")
        return real_output(request)

    def releasable_end(seq, sent):
        if _marked(seq.request.prompt_token_ids):
            raise RuntimeError("injected fault while publishing")
        return real_end(seq, sent)

    monkeypatch.setattr(engine, "output", output)
    monkeypatch.setattr(engine_loop_module, "releasable_end", releasable_end)
    bad, results = run_beside(iso_server, {"prompt": MARKED, "max_tokens": 8, "temperature": 0}, stream)
    check_failed(bad, stream, 500)
    check_unaffected(iso_server, results, expected)


# ---------------------------------------------------------------------- building the response
def test_fault_building_a_response(iso_server, expected, monkeypatch):
    real = ResponseWriter.response

    def response(self, outputs):
        if _marked(outputs[0].prompt_token_ids):
            raise RuntimeError("injected fault building the response")
        return real(self, outputs)

    monkeypatch.setattr(ResponseWriter, "response", response)
    bad, results = run_beside(iso_server, {"prompt": MARKED, "max_tokens": 8, "temperature": 0}, False)
    check_failed(bad, False, 500)
    check_unaffected(iso_server, results, expected)


def test_fault_building_a_stream_chunk(iso_server, expected, monkeypatch):
    real = ResponseWriter.chunk

    def chunk(self, delta):
        if self.n == 2:  # only the faulty request asks for two completions
            raise RuntimeError("injected fault building a chunk")
        return real(self, delta)

    monkeypatch.setattr(ResponseWriter, "chunk", chunk)
    faulty = {"prompt": MARKED, "max_tokens": 8, "n": 2, "temperature": 1, "seed": 3}
    bad, results = run_beside(iso_server, faulty, True)
    check_failed(bad, True, 500)
    check_unaffected(iso_server, results, expected)


def test_a_failing_engine_step_answers_every_request(iso_server, expected, monkeypatch):
    """The last resort: a step that fails for no request in particular fails the requests in flight (each
    gets an answer), and the next ones are served as before."""
    engine = iso_server.llm.engine
    real = engine.step
    failures = []

    def step():
        if len(failures) < 1:
            failures.append(1)
            raise RuntimeError("injected engine fault")
        return real()

    monkeypatch.setattr(engine, "step", step)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(call, iso_server.url, {"prompt": p, "max_tokens": 8, "temperature": 0}, i % 2 == 0)
                   for i, p in enumerate(NORMAL)]
        results = [f.result(timeout=ANSWER_WITHIN_S) for f in futures]
    for i, result in enumerate(results):
        if result.error is not None:  # failed by the injected step: an answer all the same
            check_failed(result, i % 2 == 0 and result.status == 200, 500)
        else:
            assert result.status == 200 and (i % 2 == 1 or result.done)
    assert any(r.error is not None for r in results)
    check_unaffected(iso_server, [], expected)
    after = call(iso_server.url, {"prompt": NORMAL[1], "max_tokens": TOKENS, "temperature": 0})
    assert (after.text, after.finish_reason) == expected[1]

"""Nothing poisons the job: a line that fails in the engine, or that the engine refuses, becomes its
error record and the others go on (exit status 0); a rerun retries the failed lines, keeps the
records of invalid ones, and runs a line again once it was fixed."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from nextok import SamplingParams
from nextok.batch import from_parquet_row, run_batch
from nextok.cli import main
from nextok.engine.engine import LLMEngine
from nextok.engine.runner import ModelRunner
from tests.batch.inject import MARKER, failing_run
from tests.test_batch import write_jsonl

OPENAI_BOOM = {"custom_id": "oa", "method": "POST", "url": "/v1/completions",
               "body": {"prompt": f"the {MARKER} here", "max_tokens": 2, "temperature": 0}}
LINES = [
    {"id": "ok1", "prompt": "the cat sat", "max_new_tokens": 3},
    {"id": "boom", "prompt": f"the {MARKER} sat", "max_new_tokens": 3},  # fails in the engine
    {"id": "badwords", "prompt": "hi", "max_new_tokens": 2, "bad_words_ids": [[999999]]},  # refused by the engine
    '{"id": "broken", "prompt": ',
    {"id": "ok1", "prompt": "again"},
    OPENAI_BOOM,
    {"id": "ok2", "prompt_token_ids": [1, 2, 3], "max_new_tokens": 2},
    {"id": "neg", "prompt": "hi", "temperature": -1, "do_sample": True},
]
FIXED = {3: {"id": "badwords", "prompt": "hi", "max_new_tokens": 2, "bad_words_ids": [[5]]},
         4: {"id": "broken", "prompt": "fixed", "max_new_tokens": 2},
         5: {"id": "ok3", "prompt": "again", "max_new_tokens": 2},
         8: {"id": "neg", "prompt": "hi", "temperature": 0.5, "do_sample": True, "max_new_tokens": 2}}


def read_output_records(path) -> list[dict]:
    if str(path).endswith(".parquet"):
        return [from_parquet_row(row) for row in pq.read_table(path).to_pylist()]
    return [json.loads(line) for line in path.read_text().splitlines()]


def keyed(records: list[dict]) -> dict:
    out = {}
    for r in records:
        key = f"line:{r['line']}" if r.get("line") else r.get("custom_id", r["id"])
        assert key not in out, f"{key} appears twice"
        out[key] = r
    return out


def code(rec: dict) -> str | None:
    if rec.get("error"):
        return rec["error"]["code"]
    response = rec.get("response") or {}
    return response["body"]["error"]["code"] if response.get("status_code", 200) != 200 else None


@pytest.fixture
def added(monkeypatch) -> list[str]:
    """The request ids the engine is given."""
    seen: list[str] = []
    original = LLMEngine.add_request

    def add_request(self, *args, **kwargs):
        seen.append(kwargs.get("request_id"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LLMEngine, "add_request", add_request)
    return seen


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_failed_lines_are_retried_invalid_kept_fixed_redone(tiny_llm, tiny_model_dir, tmp_path, monkeypatch, capsys,
                                                           added, suffix):
    src = write_jsonl(tmp_path / "in.jsonl", LINES)
    out = tmp_path / f"out.{suffix}"
    working_run = ModelRunner.run
    monkeypatch.setattr(ModelRunner, "run", failing_run)
    argv = ["batch", str(src), str(out), "--model", str(tiny_model_dir), "--dtype", "float32",
            "--kv-cache-gb", "0.0625", "--no-progress"]
    assert main(argv) == 0
    first = keyed(read_output_records(out))
    assert {k: code(r) for k, r in first.items()} == {
        "ok1": None, "boom": "server_error", "badwords": "invalid_request", "line:4": "invalid_json",
        "line:5": "duplicate_id", "oa": "server_error", "ok2": None, "neg": "invalid_parameter"}
    assert first["boom"]["error"]["message"] == "RuntimeError: injected failure"
    assert "bad_words_ids" in first["badwords"]["error"]["message"]
    assert first["oa"]["response"]["status_code"] == 500 and first["oa"]["response"]["body"]["error"]["type"] == \
           "server_error"
    assert len(first["ok1"]["outputs"][0]["token_ids"]) == 3 and len(first["ok2"]["outputs"][0]["token_ids"]) == 2
    summary = capsys.readouterr().err
    for part in ("2 server_error", "1 invalid_request", "1 invalid_json", "1 duplicate_id", "1 invalid_parameter"):
        assert part in summary

    # The failure is gone: a rerun gives the engine only the two failed lines, and keeps the rest.
    monkeypatch.setattr(ModelRunner, "run", working_run)
    added.clear()
    summary = run_batch(tiny_llm, src, out, progress=False)
    assert sorted(added) == ["boom", "oa"] and summary.redone == 2 and summary.completed == 2
    second = keyed(read_output_records(out))
    assert code(second["boom"]) is None and code(second["oa"]) is None
    assert second["oa"]["response"]["body"]["choices"][0]["text"] == \
           tiny_llm.generate(f"the {MARKER} here", SamplingParams(max_new_tokens=2), use_tqdm=False)[0].outputs[0].text
    assert {k: r for k, r in second.items() if k not in ("boom", "oa")} == \
           {k: r for k, r in first.items() if k not in ("boom", "oa")}
    assert dict(summary.errors) == {"invalid_request": 1, "invalid_json": 1, "duplicate_id": 1,
                                    "invalid_parameter": 1}

    # Nothing changed: nothing is redone.
    added.clear()
    assert run_batch(tiny_llm, src, out, progress=False).redone == 0 and added == []
    assert keyed(read_output_records(out)) == second

    # The invalid lines fixed: each runs again, and its result replaces its error record.
    write_jsonl(src, [FIXED.get(i, line) for i, line in enumerate(LINES, 1)])
    added.clear()
    summary = run_batch(tiny_llm, src, out, progress=False)
    assert sorted(added) == ["badwords", "broken", "neg", "ok3"] and summary.redone == 4
    third = keyed(read_output_records(out))
    assert sorted(third) == ["badwords", "boom", "broken", "neg", "oa", "ok1", "ok2", "ok3"]
    assert all(code(r) is None for r in third.values()) and not summary.errors
    assert third["broken"]["prompt"] == "fixed" and third["ok1"] == first["ok1"]



def test_new_flags_redo_error_records_and_removed_lines_lose_theirs(tiny_llm, tmp_path, added):
    lines = [{"id": "a", "prompt": "the cat", "max_new_tokens": 2}, {"id": "b", "prompt": "hi", "top_k": -3},
             "not json", {"id": "c"}]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    run_batch(tiny_llm, src, out, progress=False)
    before = keyed(read_output_records(out))
    assert [code(before[k]) for k in ("a", "b", "line:3", "c")] == [None, "invalid_parameter", "invalid_json",
                                                                     "missing_prompt"]
    # Other flags: the error records may no longer hold, so their lines are looked at again; results stay.
    added.clear()
    summary = run_batch(tiny_llm, src, out, SamplingParams(max_new_tokens=3), progress=False)
    assert summary.redone == 3 and summary.skipped == 1 and added == []  # none of them reaches the engine
    after = keyed(read_output_records(out))
    assert after["a"] == before["a"]
    assert {k: {**r, "input_hash": None} for k, r in after.items() if k != "a"} == \
           {k: {**r, "input_hash": None} for k, r in before.items() if k != "a"}
    assert all(after[k]["input_hash"] != before[k]["input_hash"] for k in ("b", "line:3", "c"))
    # Lines taken out of INPUT: their error records go; results are kept.
    write_jsonl(src, lines[:1])
    summary = run_batch(tiny_llm, src, out, SamplingParams(max_new_tokens=3), progress=False)
    assert summary.dropped == 3 and summary.redone == 0 and summary.total == 1 and not summary.errors
    assert keyed(read_output_records(out)) == {"a": before["a"]}

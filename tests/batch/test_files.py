"""OUTPUT files: a mixed nextok / OpenAI job gives the same records in Parquet as in JSONL; the lock
is held before OUTPUT is read and through every rewrite; a SIGKILL anywhere in a Parquet job, the
finish included, leaves every id exactly once after a rerun, with the records of an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from nextok.batch import ResultLog, from_parquet_row, read_output, run_batch
from nextok.batch.files import KILL_ENV
from nextok.engine.runner import ModelRunner
from tests.batch.inject import MARKER, failing_run
from tests.batch.test_job import keyed
from tests.test_batch import make_requests, read_records, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
CHAT = [{"role": "user", "content": "Tell me about cats"}]


def mixed_lines(n: int) -> list:
    """nextok and OpenAI lines together: results, a failure in the engine, invalid lines of both forms."""
    rows: list = make_requests(n)
    rows[1:1] = [{"custom_id": "c1", "method": "POST", "url": "/v1/completions",
                  "body": {"model": "tiny", "prompt": "the cat sat", "max_tokens": 4, "temperature": 0, "logprobs": 2}}]
    rows[4:4] = [{"custom_id": "c2", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"messages": CHAT, "max_tokens": 3, "temperature": 0.8, "seed": 7, "n": 2}}]
    return rows + [
        {"id": "boom", "prompt": f"a {MARKER}", "max_new_tokens": 2},
        {"custom_id": "c3", "method": "POST", "url": "/v1/completions", "body": {"prompt": MARKER, "max_tokens": 2}},
        {"custom_id": "c4", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
        {"method": "POST", "url": "/v1/completions", "body": {"prompt": "no custom_id"}},
        '{"id": "torn", "prompt": ',
        {"id": "words", "prompt": "hi", "bad_words_ids": [[999999]]},
        {"id": "r0", "prompt": "a duplicate"},
        {"id": "noprompt"},
    ]


def normalized(records: list[dict]) -> dict:
    """Records by key, each once; OpenAI bodies without their `created` time."""
    out = keyed(records)
    for rec in out.values():
        body = (rec.get("response") or {}).get("body") or {}
        if "created" in body:
            body["created"] = 0
    return out


def parquet_records(path: Path) -> list[dict]:
    return [from_parquet_row(row) for row in pq.read_table(path).to_pylist()]


def test_mixed_forms_give_the_same_records_in_parquet_as_in_jsonl(tiny_llm, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", mixed_lines(12))
    run_batch(tiny_llm, src, tmp_path / "out.jsonl", progress=False)
    summary = run_batch(tiny_llm, src, tmp_path / "out.parquet", max_in_flight=4, progress=False)
    assert summary.total == len(mixed_lines(12))
    jsonl = normalized(read_records(tmp_path / "out.jsonl"))
    parquet = normalized(parquet_records(tmp_path / "out.parquet"))
    assert parquet == jsonl
    assert parquet["c1"]["response"]["body"]["choices"][0]["logprobs"]["tokens"]
    assert len(parquet["c2"]["response"]["body"]["choices"]) == 2
    assert parquet["r1"]["outputs"] and parquet["r6"]["outputs"][0]["logprobs"]  # STRATEGIES[6] asks for logprobs


def test_parquet_output_is_read_only_under_the_lock(tmp_path):
    out = tmp_path / "out.parquet"
    first = ResultLog(out)
    out.write_bytes(b"not parquet yet")  # what a second job must not read while the first holds OUTPUT
    with pytest.raises(ValueError, match="another job"):
        ResultLog(out)
    out.unlink()
    first.close()
    ResultLog(out).close()


@pytest.mark.parametrize("name", ["out.jsonl", "out.parquet"])
def test_the_lock_survives_rewriting_the_log(tmp_path, name):
    out = tmp_path / name
    log = ResultLog(out)
    log.append([{"id": i, "prompt": "p", "error": {"code": "server_error", "message": "m"}} for i in range(3)])
    assert log.discard({"id:1"}) == 1  # the log is replaced by a rewritten copy
    assert sorted(log.entries) == ["id:0", "id:2"]
    with pytest.raises(ValueError, match="another job"):
        ResultLog(out)
    log.close()
    assert sorted(str(r["id"]) for r in read_output(out)) == ["0", "2"]  # Parquet keeps ids as strings


def test_a_kill_between_the_parquet_replace_and_the_log_removal_counts_each_record_once(tmp_path):
    out = tmp_path / "out.parquet"
    done = [{"id": f"r{i}", "prompt": "p", "error": None, "outputs": []} for i in range(3)]
    log = ResultLog(out)
    log.append(done)
    log.close()
    # The state such a kill leaves: the new Parquet file holds the log's records, and the log is still there.
    (tmp_path / "out.parquet.partial.jsonl").write_text("".join(json.dumps(r) + "\n" for r in done))
    log = ResultLog(out)
    assert len(log.entries) == 3
    log.append([{"id": "r3", "prompt": "p", "error": None, "outputs": []}])
    log.close()
    assert [r["id"] for r in parquet_records(out)] == ["r0", "r1", "r2", "r3"]
    assert not (tmp_path / "out.parquet.partial.jsonl").exists()


POINTS = [f"any:{n}" for n in range(1, 6)] + ["discard", "parquet-written", "log-removed"]


def test_sigkill_at_20_points_of_a_parquet_job_then_rerun(tiny_llm, tiny_model_dir, tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", mixed_lines(8))
    monkeypatch.setattr(ModelRunner, "run", failing_run)
    run_batch(tiny_llm, src, tmp_path / "reference.parquet", progress=False)
    reference = normalized(parquet_records(tmp_path / "reference.parquet"))
    assert reference["boom"]["error"]["code"] == "server_error"  # retried, and failing again, on every rerun

    def job(out: Path, kill_at: str | None) -> str | None:
        """Run the job (with the failure injected); the checkpoint it was killed at, or None."""
        env = {k: v for k, v in os.environ.items() if k != KILL_ENV}
        if kill_at:
            env[KILL_ENV] = kill_at
        cmd = [sys.executable, "-m", "tests.batch.inject", "batch", str(src), str(out), "--model", str(tiny_model_dir),
               "--dtype", "float32", "--kv-cache-gb", "0.0625", "--max-in-flight", "2", "--no-progress"]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode in (0, -9), proc.stderr[-2000:]
        killed = re.search(r"killed at (\S+)", proc.stderr)
        assert (proc.returncode == -9) == (killed is not None), proc.stderr[-2000:]
        return killed and killed.group(1)

    # A whole run passes 10 "append" checkpoints, then the finish's 3; a rerun has "discard" (the two failed
    # lines are retried), "append" and the finish. Killing most runs at one of their first 5 checkpoints
    # moves the job on a little each time, through every phase, reruns included.
    rng = random.Random(20)
    kills: list[str] = []
    for chain in range(2):
        out = tmp_path / f"out{chain}.parquet"
        for _ in range(30):
            if len(kills) == 10 * chain + 9:
                break
            killed = job(out, rng.choice(POINTS))  # None: the run never got there (it had less to do) and finished
            kills += [killed] if killed else []
            for key, rec in normalized(read_output(out)).items():  # what a kill leaves is right, if not complete
                assert rec == reference[key], key
        kills.append(job(out, "parquet-replaced"))  # the very end: after the final replace, before the log goes
        assert kills[-1] == "parquet-replaced"
        assert job(out, None) is None
        assert not Path(f"{out}.partial.jsonl").exists()
        assert normalized(parquet_records(out)) == reference  # `normalized` fails on a key found twice
    assert len(kills) == 20
    assert set(kills) == {"append", "discard", "parquet-written", "parquet-replaced", "log-removed"}, kills

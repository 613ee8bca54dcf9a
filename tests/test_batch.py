"""nextok batch: same results as LLM.generate, survives kill -9, bad lines become error records."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nextok import SamplingParams
from nextok.batch import ResultLog, parse_line, request_seed, run_batch
from nextok.cli import main

WORDS = "the cat sat on a warm mat while rain fell over quiet hills and old roads".split()

# Mixed strategies: greedy, beam search, seeded and unseeded sampling with every warper, penalties.
STRATEGIES: list[dict] = [
    {},
    {"num_beams": 3, "num_return_sequences": 2, "length_penalty": 0.8},
    {"num_beams": 2, "early_stopping": True, "no_repeat_ngram_size": 2},
    {"do_sample": True, "seed": 11, "top_k": 20, "temperature": 0.7},
    {"do_sample": True, "seed": 5, "top_p": 0.9, "num_return_sequences": 2},
    {"do_sample": True, "min_p": 0.05, "typical_p": 0.95},  # no seed: derived from the id
    {"repetition_penalty": 1.3, "logprobs": 2},
    {"do_sample": True, "seed": 3, "repetition_penalty": 1.2, "stop": [" the"]},
    {"min_new_tokens": 4, "frequency_penalty": 0.5},
]


def make_requests(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        length = 1 + (i * 7) % 40  # mixed prompt lengths
        prompt = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(length))
        rows.append({"id": f"r{i}", "prompt": prompt, "max_new_tokens": 2 + i % 6, **STRATEGIES[i % len(STRATEGIES)]})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_records(path: Path) -> list[dict]:
    text = path.read_text()
    assert text == "" or text.endswith("\n"), "a half-written line survived"
    return [json.loads(line) for line in text.splitlines()]


def by_id(records: list[dict]) -> dict:
    out = {}
    for r in records:
        assert r["id"] not in out, f"id {r['id']} appears twice"
        out[r["id"]] = r
    return out


def assert_same_outputs(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g["index"], g["token_ids"], g["text"], g["finish_reason"]) == \
               (w["index"], w["token_ids"], w["text"], w["finish_reason"])
        assert g["score"] == pytest.approx(w["score"], rel=1e-4, abs=1e-4)
        assert (g["logprobs"] is None) == (w["logprobs"] is None)


@pytest.fixture(scope="module")
def requests_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("batch") / "in.jsonl", make_requests(200))


@pytest.fixture(scope="module")
def reference_run(tiny_llm, requests_file, tmp_path_factory) -> dict:
    """One uninterrupted run of the 200-request file (the kill test streams it 32 at a time)."""
    out = tmp_path_factory.mktemp("batch") / "out.jsonl"
    summary = run_batch(tiny_llm, requests_file, out, progress=False)
    assert summary.completed == 200 and not summary.errors
    return by_id(read_records(out))


def test_results_equal_llm_generate(tiny_llm, reference_run):
    rows = make_requests(200)
    params = [SamplingParams.from_dict({"seed": request_seed(r["id"]), **{k: v for k, v in r.items()
                                        if k not in ("id", "prompt")}}) for r in rows]
    expected = tiny_llm.generate([r["prompt"] for r in rows], params, use_tqdm=False)
    assert len(reference_run) == 200
    for row, want in zip(rows, expected):
        rec = reference_run[row["id"]]
        assert rec["error"] is None and rec["prompt"] == row["prompt"]
        assert_same_outputs(rec["outputs"], [c.__dict__ for c in want.outputs])


def test_sigkill_then_rerun_gives_every_id_once_and_same_results(tiny_model_dir, requests_file, reference_run,
                                                                   tmp_path):
    rows = make_requests(200)[:100]  # half the file keeps the two runs short
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "nextok.cli", "batch", str(src), str(out), "--model", str(tiny_model_dir),
           "--dtype", "float32", "--kv-cache-gb", "0.0625", "--max-in-flight", "32", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 10:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the job ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = out.read_bytes()
    done = partial.count(b"\n")
    assert 0 < done < len(rows)
    with open(out, "ab") as f:  # as if the kill had torn the last write in half
        f.write(b'{"id": "r99", "prompt": "the cat", "outp')

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{done} from an earlier run" in rerun.stderr
    records = by_id(read_records(out))
    assert sorted(records) == sorted(r["id"] for r in rows)
    for request_id, rec in records.items():
        assert_same_outputs(rec["outputs"], reference_run[request_id]["outputs"])


def test_bad_lines_become_error_records_and_the_job_finishes(tiny_model_dir, tmp_path, capsys):
    lines = [
        {"id": "ok1", "prompt": "the cat sat", "max_new_tokens": 3},
        '{"id": "broken", "prompt": ',
        {"id": "noprompt", "max_new_tokens": 3},
        {"id": "badvalue", "prompt": "hi", "temperature": -1, "do_sample": True},
        {"id": "typo", "prompt": "hi", "max_new_token": 3},
        {"id": "ok1", "prompt": "again"},
        {"prompt": "no id"},
        {"id": "toolong", "prompt": "hi " * 8300},  # past the tiny model's 8192-token context
        "[1, 2]",
        {"id": "ok2", "prompt_token_ids": [1, 2, 3], "max_new_tokens": 2},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    argv = ["batch", str(src), str(out), "--model", str(tiny_model_dir), "--dtype", "float32",
            "--kv-cache-gb", "0.0625", "--no-progress"]
    assert main(argv) == 0
    records = read_records(out)
    assert len(records) == len(lines)
    errors = {r.get("line") or r["id"]: r["error"] for r in records if r["error"]}
    codes = {k: e["code"] for k, e in errors.items()}
    assert codes == {2: "invalid_json", "noprompt": "missing_prompt", "badvalue": "invalid_parameter",
                     "typo": "invalid_parameter", 6: "duplicate_id", 7: "missing_id",
                     "toolong": "invalid_request", 9: "invalid_json"}
    assert "temperature" in errors["badvalue"]["message"] and "max_new_tokens" in errors["typo"]["message"]
    assert "context" in errors["toolong"]["message"]
    ok = {r["id"]: r for r in records if not r["error"]}
    assert set(ok) == {"ok1", "ok2"} and len(ok["ok2"]["outputs"][0]["token_ids"]) == 2
    summary = capsys.readouterr().err
    assert "2 invalid_json" in summary and "1 duplicate_id" in summary and "2 invalid_parameter" in summary
    # Rerunning finds every line answered: nothing added, nothing duplicated.
    assert main(argv) == 0
    assert read_records(out) == records


def test_openai_batch_input_gives_openai_batch_output(tiny_llm, tmp_path):
    chat = [{"role": "user", "content": "Tell me about cats"}]
    lines = [
        {"custom_id": "c1", "method": "POST", "url": "/v1/completions",
         "body": {"model": "tiny", "prompt": "the cat sat", "max_tokens": 6, "temperature": 0, "logprobs": 2}},
        {"custom_id": "c2", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "tiny", "messages": chat, "max_tokens": 5, "temperature": 0.8, "seed": 7, "n": 2}},
        {"custom_id": "c3", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
    ]
    out = tmp_path / "out.jsonl"
    run_batch(tiny_llm, write_jsonl(tmp_path / "in.jsonl", lines), out, progress=False)
    records = {r["custom_id"]: r for r in read_records(out)}

    c1 = records["c1"]
    assert c1["id"].startswith("batch_req_") and c1["error"] is None
    assert c1["response"]["status_code"] == 200
    body = c1["response"]["body"]
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    want = tiny_llm.generate("the cat sat", SamplingParams(max_new_tokens=6, logprobs=2), use_tqdm=False)[0]
    assert body["choices"][0]["text"] == want.outputs[0].text
    assert body["choices"][0]["finish_reason"] == want.outputs[0].finish_reason
    assert len(body["choices"][0]["logprobs"]["tokens"]) == len(want.outputs[0].token_ids)
    assert body["usage"]["completion_tokens"] == len(want.outputs[0].token_ids)

    body = records["c2"]["response"]["body"]
    assert body["object"] == "chat.completion" and len(body["choices"]) == 2
    want = tiny_llm.chat(chat, SamplingParams(max_new_tokens=5, do_sample=True, temperature=0.8, top_k=0, seed=7,
                                              num_return_sequences=2))
    assert [c["message"]["content"] for c in body["choices"]] == [c.text for c in want.outputs]
    assert body["choices"][0]["message"]["role"] == "assistant"

    c3 = records["c3"]["response"]
    assert c3["status_code"] == 400 and "/v1/embeddings" in c3["body"]["error"]["message"]


def test_parquet_in_and_out_matches_jsonl(tiny_llm, reference_run, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nextok.batch import from_parquet_row

    rows = make_requests(200)[:20]
    columns = sorted({k for r in rows for k in r})  # absent fields are null columns, as a real table has them
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in rows]), tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    summary = run_batch(tiny_llm, tmp_path / "in.parquet", out, max_in_flight=32, progress=False)
    assert summary.completed == 20 and not (tmp_path / "out.parquet.partial.jsonl").exists()
    records = [from_parquet_row(r) for r in pq.read_table(out).to_pylist()]
    assert sorted(r["id"] for r in records) == sorted(r["id"] for r in rows)
    for rec in records:
        assert_same_outputs(rec["outputs"], reference_run[rec["id"]]["outputs"])
    assert run_batch(tiny_llm, tmp_path / "in.parquet", out, progress=False).skipped == 20


def test_parse_line_catches_duplicates_by_string_id():
    seen: set[str] = set()
    assert parse_line(b'{"id": 1, "prompt": "a"}', 1, seen).error is None
    dup = parse_line(b'{"id": "1", "prompt": "b"}', 2, seen)
    assert dup.error[0] == "duplicate_id" and dup.key == "line:2"


def test_a_second_job_cannot_write_the_same_output(tmp_path):
    log = ResultLog(tmp_path / "out.jsonl")
    with pytest.raises(ValueError, match="another job"):
        ResultLog(tmp_path / "out.jsonl")
    log.close()
    ResultLog(tmp_path / "out.jsonl").close()

"""Records: errors of the engine become error records of either form, and one Parquet schema holds
nextok and OpenAI records together, each row read back as exactly the record it came from."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from nextok.batch import error_code, from_parquet_row, parse_line, record, records_to_table
from nextok.outputs import Completion, RequestOutput

NEXTOK_RESULT = {"id": "a", "prompt": "the cat", "outputs": [
    {"index": 0, "text": " sat", "token_ids": [5, 6], "finish_reason": "length", "score": -1.25,
     "logprobs": [{"5": -0.5, "9": -1.5}, {"6": -0.75}]},
    {"index": 1, "text": "", "token_ids": [], "finish_reason": "stop", "score": 0.0, "logprobs": None}],
    "error": None}
NEXTOK_TOKENS = {"id": "b", "prompt": None, "outputs": [
    {"index": 0, "text": "x", "token_ids": [1], "finish_reason": "stop", "score": -0.5, "logprobs": None}],
    "error": None}
NEXTOK_ERROR = {"id": "c", "prompt": "hi", "error": {"code": "server_error", "message": "RuntimeError: boom"},
                "input_hash": "0123456789abcdef"}
NEXTOK_LINE_ERROR = {"id": None, "prompt": None, "error": {"code": "invalid_json", "message": "line 4 is not JSON"},
                     "line": 4, "input_hash": "fedcba9876543210"}
COMPLETION = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "tiny",
              "choices": [{"index": 0, "text": " hi", "logprobs": None, "finish_reason": "length"}],
              "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}
OPENAI_RESULT = {"id": "batch_req_1", "custom_id": "d",
                 "response": {"status_code": 200, "request_id": "req_1", "body": COMPLETION}, "error": None}
FAILURE = {"message": "RuntimeError: boom", "type": "server_error", "param": None, "code": "server_error"}
OPENAI_500 = {"id": "batch_req_2", "custom_id": "e",
              "response": {"status_code": 500, "request_id": "req_2", "body": {"error": FAILURE}},
              "error": None, "input_hash": "00000000000000aa"}
OPENAI_LINE_ERROR = {"id": "batch_req_3", "custom_id": None, "response": None,
                     "error": {"code": "missing_id", "message": "line 9 has no 'custom_id'"}, "line": 9,
                     "input_hash": "00000000000000bb"}
ALL = [NEXTOK_RESULT, OPENAI_RESULT, NEXTOK_TOKENS, OPENAI_500, NEXTOK_ERROR, OPENAI_LINE_ERROR, NEXTOK_LINE_ERROR]


def test_mixed_records_round_trip_through_parquet_exactly(tmp_path):
    pq.write_table(records_to_table(ALL), tmp_path / "out.parquet")
    back = [from_parquet_row(row) for row in pq.read_table(tmp_path / "out.parquet").to_pylist()]
    assert back == ALL
    assert [json.dumps(r) for r in back] == [json.dumps(r) for r in ALL]  # key order too: same JSON lines


def test_records_to_table_has_one_schema_whatever_the_mix():
    assert records_to_table([NEXTOK_RESULT]).schema == records_to_table([OPENAI_RESULT]).schema == \
           records_to_table([]).schema
    table = records_to_table(ALL)
    assert table.column("format").to_pylist() == ["nextok", "openai", "nextok", "openai", "nextok", "openai", "nextok"]
    assert table.column("outputs").null_count == 5 and table.column("response").null_count == 5


def test_parquet_files_of_earlier_versions_are_read_back(tmp_path):
    old_openai = pa.table({"id": ["batch_req_1", "batch_req_3"], "custom_id": ["d", None], "line": [None, 9],
                           "response": [json.dumps(OPENAI_RESULT["response"]), "null"],
                           "error": ["null", json.dumps(OPENAI_LINE_ERROR["error"])]})
    rows = [from_parquet_row(r) for r in old_openai.to_pylist()]
    assert rows[0] == OPENAI_RESULT
    assert rows[1] == {k: v for k, v in OPENAI_LINE_ERROR.items() if k != "input_hash"}
    old_nextok = {"id": "c", "line": None, "prompt": "hi", "outputs": None, "error": NEXTOK_ERROR["error"]}
    assert from_parquet_row(old_nextok) == {"id": "c", "prompt": "hi", "error": NEXTOK_ERROR["error"]}


def _failed(error_type: str) -> RequestOutput:
    return RequestOutput("x", "hi", [1, 2], [Completion(0, " partial", [7], "error")], finished=True,
                         error="RuntimeError: boom" if error_type == "server_error" else "bad value",
                         error_type=error_type)


def test_a_request_failed_in_the_engine_becomes_an_error_record():
    item = parse_line(b'{"id": "x", "prompt": "hi"}', 1)  # not prepared: no prompt text yet
    rec = record(item, _failed("server_error"))
    assert rec == {"id": "x", "prompt": None, "error": {"code": "server_error", "message": "RuntimeError: boom"},
                   "input_hash": item.input_hash}
    assert error_code(rec) == "server_error"
    rec = record(parse_line(b'{"id": "x", "prompt": "hi"}', 1), _failed("invalid_request_error"))
    assert rec["error"] == {"code": "invalid_request", "message": "bad value"} and "outputs" not in rec


def test_openai_failures_are_500_for_the_engine_and_400_for_the_request():
    line = {"custom_id": "o", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hi"}}
    rec = record(parse_line(json.dumps(line), 1), _failed("server_error"))
    assert rec["response"]["status_code"] == 500 and rec["error"] is None
    assert rec["response"]["body"]["error"] == {"message": "RuntimeError: boom", "type": "server_error",
                                                "param": None, "code": "server_error"}
    rec = record(parse_line(json.dumps(line), 1), _failed("invalid_request_error"))
    assert rec["response"]["status_code"] == 400 and error_code(rec) == "invalid_request"
    assert rec["response"]["body"]["error"]["type"] == "invalid_request_error"


def test_input_hash_follows_the_line_content_and_the_flags():
    a = parse_line(b'{"id": "x", "prompt": "hi"}\n', 1).input_hash
    assert a == parse_line(b'{"id": "x", "prompt": "hi"}\r\n', 7).input_hash  # not the line number or ending
    assert a != parse_line(b'{"id": "x", "prompt": "ho"}', 1).input_hash
    assert a != parse_line(b'{"id": "x", "prompt": "hi"}', 1, salt="other flags").input_hash
    row = {"id": "x", "prompt": "hi", "seed": None}  # a Parquet row: null columns are absent fields
    assert parse_line(row, 1).input_hash == parse_line({"prompt": "hi", "id": "x"}, 1).input_hash

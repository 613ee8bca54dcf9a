"""Batch jobs: every line of a JSONL or Parquet file through one continuously batched engine.

A result line is appended to OUTPUT as soon as its request finishes, in one write, so a killed job
leaves whole lines only; rerunning the same command skips the ids already in OUTPUT. Requests
without a `seed` get one derived from their id (`request_seed`), so a sampled request gives the
same text whether the job ran in one go or was resumed. Parquet OUTPUT is written at the end from
OUTPUT.partial.jsonl; a kill at any point of that finish leaves every id exactly once after a rerun.

Nothing poisons the job: a bad line, a request the engine refuses, or one that fails in the engine
becomes that line's error record (`"error": {"code", "message"}`; OpenAI lines get a response with
status 400, or 500 for `server_error`) and the others go on; the exit status is 0 and the summary
counts the errors by code.

Rerun rule: OUTPUT holds one record per id (lines without a usable id, and later lines repeating
an id, are keyed by line number). A rerun keeps every result, and keeps an error record only while
its line is unchanged: error records carry `input_hash`, a hash of the line and of the job's
sampling flags. So a rerun
  - retries lines that failed in the engine (code `server_error`);
  - keeps the error records of invalid lines (invalid_json, missing_id, duplicate_id,
    missing_prompt, invalid_parameter, invalid_request) as they are;
  - runs a line again once it was changed (fixed), replacing its error record, and drops error
    records whose line is no longer in INPUT.

Input lines: nextok's form `{"id", "prompt" | "prompt_token_ids" | "messages", SamplingParams
fields...}` or the OpenAI batch form `{"custom_id", "method", "url", "body"}` (answered in the
OpenAI batch output form); one INPUT may mix them. Ids are compared as strings.
"""

from nextok.batch.files import ResultLog, is_parquet, read_output
from nextok.batch.job import BatchSummary, redo_keys, run_batch, run_items
from nextok.batch.parquet import from_parquet_row, records_to_table
from nextok.batch.records import RETRYABLE_CODES, error_code, record, to_json_line
from nextok.batch.requests import BatchItem, input_hash, parse_line, prepare, request_seed

__all__ = [
    "RETRYABLE_CODES", "BatchItem", "BatchSummary", "ResultLog", "error_code", "from_parquet_row", "input_hash",
    "is_parquet", "parse_line", "prepare", "read_output", "record", "records_to_table", "redo_keys", "request_seed",
    "run_batch", "run_items", "to_json_line",
]

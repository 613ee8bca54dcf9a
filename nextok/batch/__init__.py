"""Batch jobs: every line of a JSONL or Parquet file through one continuously batched engine.

A result line is appended to OUTPUT as soon as its request finishes, in one write, so a killed job
leaves whole lines only; rerunning the same command skips the ids already in OUTPUT. Requests
without a `seed` get one derived from their id (`request_seed`), so a sampled request gives the
same text whether the job ran in one go or was resumed. Bad lines become error records.

Input lines: nextok's form `{"id", "prompt" | "prompt_token_ids" | "messages", SamplingParams
fields...}` or the OpenAI batch form `{"custom_id", "method", "url", "body"}` (answered in the
OpenAI batch output form). Ids are compared as strings.
"""

from nextok.batch.files import ResultLog, from_parquet_row, is_parquet, records_to_table
from nextok.batch.job import BatchSummary, run_batch, run_items
from nextok.batch.records import record, to_json_line
from nextok.batch.requests import BatchItem, parse_line, prepare, request_seed

__all__ = [
    "BatchItem", "BatchSummary", "ResultLog", "from_parquet_row", "is_parquet", "parse_line", "prepare", "record",
    "records_to_table", "request_seed", "run_batch", "run_items", "to_json_line",
]

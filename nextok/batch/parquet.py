"""Records as Parquet: one schema for nextok and OpenAI batch records, so a mixed job keeps every result.

Columns: `format` ("nextok" or "openai"), `id`, `custom_id`, `line`, `prompt`, `outputs` (nextok
completions, logprobs as maps), `response` (the OpenAI response as JSON text), `error` ({code,
message}, either form) and `input_hash` (error records). Ids are stored as strings.
`from_parquet_row` gives back the JSONL record exactly, and reads the files of earlier versions too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa


def schema() -> pa.Schema:
    """The Arrow schema of batch records (the same for every batch, so tables always concatenate)."""
    import pyarrow as pa

    completion = pa.struct([("index", pa.int64()), ("text", pa.string()), ("token_ids", pa.list_(pa.int64())),
                            ("finish_reason", pa.string()), ("score", pa.float64()),
                            ("logprobs", pa.list_(pa.map_(pa.int64(), pa.float64())))])
    error = pa.struct([("code", pa.string()), ("message", pa.string())])
    return pa.schema([("format", pa.string()), ("id", pa.string()), ("custom_id", pa.string()),
                      ("line", pa.int64()), ("prompt", pa.string()), ("outputs", pa.list_(completion)),
                      ("response", pa.string()), ("error", error), ("input_hash", pa.string())])


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _row(r: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"id": _str(r["id"]), "line": r.get("line"), "error": r.get("error"),
                           "input_hash": r.get("input_hash")}
    if "custom_id" in r:  # the OpenAI batch form
        response = r.get("response")
        row.update(format="openai", custom_id=_str(r["custom_id"]),
                   response=None if response is None else json.dumps(response, ensure_ascii=False))
        return row
    outputs = None
    if "outputs" in r:
        outputs = [{**c, "logprobs": None if c["logprobs"] is None else
                    [[(int(t), lp) for t, lp in step.items()] for step in c["logprobs"]]} for c in r["outputs"]]
    row.update(format="nextok", prompt=r.get("prompt"), outputs=outputs)
    return row


def records_to_table(records: list[dict[str, Any]]) -> pa.Table:
    """Records of either form (mixed or not) as an Arrow table with `schema()`."""
    import pyarrow as pa

    return pa.Table.from_pylist([_row(r) for r in records], schema=schema())


def from_parquet_row(row: dict[str, Any]) -> dict[str, Any]:
    """A Parquet row back into the JSONL record it came from (ids stay strings)."""
    form = row.get("format") or ("openai" if "custom_id" in row else "nextok")  # files without `format`: one form
    error = row.get("error")
    if isinstance(error, str):  # OpenAI files of earlier versions kept the error as JSON text
        error = json.loads(error)
    if form == "openai":
        response = row.get("response")
        rec = {"id": row["id"], "custom_id": row.get("custom_id"),
               "response": None if response is None else json.loads(response), "error": error}
    else:
        rec = {"id": row["id"], "prompt": row.get("prompt")}
        if row.get("outputs") is not None:
            rec["outputs"] = [{**c, "logprobs": None if c["logprobs"] is None else
                               [{str(t): lp for t, lp in step} for step in c["logprobs"]]} for c in row["outputs"]]
        rec["error"] = error
    if row.get("line") is not None:
        rec["line"] = row["line"]
    if row.get("input_hash") is not None:
        rec["input_hash"] = row["input_hash"]
    return rec


def read_rows(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The records of a Parquet OUTPUT, a batch of rows at a time (memory stays flat)."""
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield from_parquet_row(row)


def write_records(path: str | os.PathLike, records: Iterable[dict[str, Any]], chunk: int = 1024) -> None:
    """Write records to a Parquet file, `chunk` rows per row group: memory stays flat however many."""
    import pyarrow.parquet as pq

    with pq.ParquetWriter(path, schema()) as writer:
        buffer: list[dict[str, Any]] = []
        for rec in records:
            buffer.append(rec)
            if len(buffer) == chunk:
                writer.write_table(records_to_table(buffer))
                buffer = []
        if buffer:
            writer.write_table(records_to_table(buffer))

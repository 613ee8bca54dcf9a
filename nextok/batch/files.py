"""Reading a job's input and appending its results: JSONL and Parquet, resumable, never a half line."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nextok.batch.records import record_key, to_json_line


def read_input(path: str | os.PathLike) -> Iterator[tuple[bytes | dict, int]]:
    """(raw line or row, 1-based line / row number) for each non-blank JSONL line or Parquet row."""
    if is_parquet(path):
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for obj in batch.to_pylist():
                row += 1
                yield obj, row
        return
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if raw.strip():
                yield raw, number


def count_input(path: str | os.PathLike) -> int:
    if is_parquet(path):
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with open(path, "rb") as f:
        return sum(1 for raw in f if raw.strip())


def is_parquet(path: str | os.PathLike) -> bool:
    return str(path).endswith((".parquet", ".pq"))


def generated_tokens(rec: dict[str, Any]) -> int:
    if "outputs" in rec:
        return sum(len(c["token_ids"]) for c in rec["outputs"] or [])
    body = (rec.get("response") or {}).get("body") or {}
    return body["usage"]["completion_tokens"] if "usage" in body else 0


class ResultLog:
    """OUTPUT as an append-only JSONL log that survives kill -9.

    Each group of finished records is one os.write on an O_APPEND file, so a killed job leaves at
    most an unterminated last line, which opening the log again cuts off; each group is fsynced, so
    it survives the machine going down too. A lock keeps a second job off the same OUTPUT.
    For Parquet OUTPUT the log is OUTPUT.partial.jsonl, turned into the Parquet file when the job ends.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.parquet = is_parquet(path)
        self.log_path = Path(f"{path}.partial.jsonl") if self.parquet else self.path
        self.keys: set[str] = set()
        self.error_codes: list[str] = []
        if self.parquet and self.path.exists():
            import pyarrow.parquet as pq

            for rec in pq.read_table(self.path).to_pylist():
                self._note(from_parquet_row(rec))
        self.fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise ValueError(f"another job is writing {self.log_path}: wait for it, or give another OUTPUT") from None
        self._recover()

    def _note(self, rec: dict[str, Any]) -> None:
        self.keys.add(record_key(rec))
        if rec.get("error"):
            self.error_codes.append(rec["error"]["code"])
        elif (rec.get("response") or {}).get("status_code", 200) != 200:
            self.error_codes.append(rec["response"]["body"]["error"]["code"])

    def _recover(self) -> None:
        if not self.log_path.exists():
            return
        with open(self.log_path, "r+b") as f:
            good = 0
            for raw in f:
                if not raw.endswith(b"\n"):
                    break
                try:
                    self._note(json.loads(raw))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    break  # a torn write: drop it and everything after
                good += len(raw)
            f.truncate(good)

    def append(self, records: list[dict[str, Any]]) -> None:
        data = b"".join(to_json_line(r) for r in records)
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        os.fsync(self.fd)
        for rec in records:
            self._note(rec)

    def close(self) -> None:
        os.fsync(self.fd)
        try:
            if self.parquet:
                self._write_parquet()
        finally:
            os.close(self.fd)  # releases the lock

    def _write_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = [pq.read_table(self.path)] if self.path.exists() else []
        with open(self.log_path, "rb") as f:
            rows = [json.loads(raw) for raw in f]
        if rows or not tables:
            tables.append(records_to_table(rows))
        tmp = self.path.with_name(self.path.name + ".tmp")
        pq.write_table(pa.concat_tables(tables, promote_options="permissive"), tmp)
        os.replace(tmp, self.path)
        self.log_path.unlink()


def records_to_table(records: list[dict[str, Any]]):
    """Records as an Arrow table: OpenAI records keep response/error as JSON text, logprobs become maps."""
    import pyarrow as pa

    if any("custom_id" in r for r in records):
        return pa.Table.from_pylist([
            {"id": r["id"], "custom_id": None if r.get("custom_id") is None else str(r["custom_id"]),
             "line": r.get("line"), "response": json.dumps(r.get("response")), "error": json.dumps(r["error"])}
            for r in records
        ], schema=pa.schema([("id", pa.string()), ("custom_id", pa.string()), ("line", pa.int64()),
                             ("response", pa.string()), ("error", pa.string())]))
    completion = pa.struct([("index", pa.int64()), ("text", pa.string()), ("token_ids", pa.list_(pa.int64())),
                            ("finish_reason", pa.string()), ("score", pa.float64()),
                            ("logprobs", pa.list_(pa.map_(pa.int64(), pa.float64())))])
    schema = pa.schema([("id", pa.string()), ("line", pa.int64()), ("prompt", pa.string()),
                        ("outputs", pa.list_(completion)),
                        ("error", pa.struct([("code", pa.string()), ("message", pa.string())]))])
    rows = []
    for r in records:
        outputs = [{**c, "logprobs": None if c["logprobs"] is None else
                    [[(int(t), lp) for t, lp in step.items()] for step in c["logprobs"]]} for c in r.get("outputs") or []]
        rows.append({"id": None if r["id"] is None else str(r["id"]), "line": r.get("line"), "prompt": r.get("prompt"),
                     "outputs": outputs if "outputs" in r else None, "error": r.get("error")})
    return pa.Table.from_pylist(rows, schema=schema)


def from_parquet_row(row: dict[str, Any]) -> dict[str, Any]:
    """A Parquet row back into the JSONL record it came from (ids stay strings)."""
    if "custom_id" in row:
        rec = {"id": row["id"], "custom_id": row["custom_id"], "response": json.loads(row["response"]),
               "error": json.loads(row["error"])}
    else:
        rec = {"id": row["id"], "prompt": row["prompt"], "error": row["error"]}
        if row["outputs"] is not None:
            rec["outputs"] = [{**c, "logprobs": None if c["logprobs"] is None else
                               [{str(t): lp for t, lp in step} for step in c["logprobs"]]} for c in row["outputs"]]
    if row.get("line") is not None:
        rec["line"] = row["line"]
    return rec

"""Reading a job's input and keeping its results: JSONL and Parquet, resumable, never a half line.

Crash safety: every change of OUTPUT is an append (of whole, fsynced lines) or an os.replace of a
complete, fsynced file. A killed job leaves OUTPUT (and for Parquet, OUTPUT.partial.jsonl) in a
state the next run reads back whatever the kill point was: where a key is found twice (a kill
between a Parquet OUTPUT's replace and the removal of its log), the later record wins, and the
next finish writes it once.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from nextok.batch.parquet import read_rows, write_records
from nextok.batch.records import error_code, record_key, to_json_line

# Tests only: "NAME:N" SIGKILLs the job at the N-th checkpoint NAME ("any": of any name); see `checkpoint`.
KILL_ENV = "NEXTOK_BATCH_KILL_AT"
_passed: Counter = Counter()


def checkpoint(name: str) -> None:
    """A point where a crash must leave a recoverable OUTPUT: "append" (after each group of records),
    "discard" (error records dropped), "parquet-written", "parquet-replaced", "log-removed" (the
    Parquet finish). Under $NEXTOK_BATCH_KILL_AT (tests) the job kills itself there with SIGKILL."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    want, _, n = spec.partition(":")
    if want in (name, "any"):
        _passed[want] += 1
        if _passed[want] == int(n or 1):
            os.write(2, f"nextok: {KILL_ENV}: killed at {name}\n".encode())
            os.kill(os.getpid(), signal.SIGKILL)


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


class Entry(NamedTuple):
    """What a job needs to know of a record in OUTPUT."""

    code: str | None  # error code; None for a result
    input_hash: str | None  # of the line an error record answered
    pos: int  # where the winning record is: line pos of the log, or row -pos-1 of the Parquet OUTPUT


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock(path: Path, truncate: bool = False) -> int:
    """An O_APPEND fd of `path`, locked; ValueError where another job holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | (os.O_TRUNC if truncate else 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ValueError(f"another job is writing {path}: wait for it, or give another OUTPUT") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the file was replaced or removed by the job that held it: lock the one there now


class ResultLog:
    """OUTPUT as an append-only JSONL log that survives kill -9.

    Each group of finished records is one os.write on an O_APPEND file, so a killed job leaves at
    most an unterminated last line, which opening the log again cuts off; each group is fsynced, so
    it survives the machine going down too. A lock keeps a second job off the same OUTPUT (the lock
    is taken before anything is read). For Parquet OUTPUT the log is OUTPUT.partial.jsonl, merged
    into the Parquet file when the job ends. `entries` holds one Entry per key; `discard` drops records
    (errors to redo) by rewriting the log, never leaving a key twice in it.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.parquet = is_parquet(path)
        self.log_path = Path(f"{path}.partial.jsonl") if self.parquet else self.path
        self.entries: dict[str, Entry] = {}
        self._lines = 0  # lines in the log
        # Whether the log / the Parquet OUTPUT holds records that are not their key's winner.
        self._log_stale = self._parquet_stale = False
        self.fd = _lock(self.log_path)
        try:
            for tmp in (self._tmp(self.log_path), self._tmp(self.path)):
                tmp.unlink(missing_ok=True)  # left by a killed job
            if self.parquet and self.path.exists():
                for row, rec in enumerate(read_rows(self.path)):
                    self._note(rec, -row - 1)
            self._recover()
        except BaseException:
            os.close(self.fd)
            raise

    @staticmethod
    def _tmp(path: Path) -> Path:
        return path.with_name(path.name + ".tmp")

    def error_codes(self) -> Counter:
        """Error records in OUTPUT, by code."""
        return Counter(e.code for e in self.entries.values() if e.code is not None)

    def _note(self, rec: dict[str, Any], pos: int) -> None:
        key = record_key(rec)
        if key in self.entries:
            self._lose(self.entries[key])
        self.entries[key] = Entry(error_code(rec), rec.get("input_hash"), pos)

    def _lose(self, entry: Entry) -> None:
        """`entry`'s record stops being its key's winner: its file holds a stale record."""
        if entry.pos < 0:
            self._parquet_stale = True
        else:
            self._log_stale = True

    def _recover(self) -> None:
        with open(self.log_path, "r+b") as f:
            good = 0
            for raw in f:
                if not raw.endswith(b"\n"):
                    break
                try:
                    rec = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    break  # a torn write: drop it and everything after
                self._note(rec, self._lines)
                self._lines += 1
                good += len(raw)
            f.truncate(good)

    def append(self, records: list[dict[str, Any]]) -> None:
        _write_all(self.fd, b"".join(to_json_line(r) for r in records))
        os.fsync(self.fd)
        for rec in records:
            self._note(rec, self._lines)
            self._lines += 1
        checkpoint("append")

    def discard(self, keys: Iterable[str]) -> int:
        """Forget the records of `keys` (to be redone); returns how many there were.

        The log is rewritten without them (and without any record a later one of its key replaced):
        a complete new file, then os.replace, so a kill leaves the old log or the new one.
        """
        dropped = 0
        for key in keys:
            entry = self.entries.pop(key, None)
            if entry is not None:
                dropped += 1
                self._lose(entry)
        if self._log_stale:
            self._rewrite_log()
        if dropped:
            checkpoint("discard")
        return dropped

    def _rewrite_log(self) -> None:
        tmp = self._tmp(self.log_path)
        fd = _lock(tmp, truncate=True)  # locked before it takes OUTPUT's name: no moment without a lock
        try:
            kept, chunk = 0, []
            with open(self.log_path, "rb") as f:
                for pos, raw in enumerate(f):
                    key = record_key(json.loads(raw))
                    entry = self.entries.get(key)
                    if entry is not None and entry.pos == pos:
                        chunk.append(raw)
                        self.entries[key] = entry._replace(pos=kept)
                        kept += 1
                    if len(chunk) == 1024:
                        _write_all(fd, b"".join(chunk))
                        chunk = []
            _write_all(fd, b"".join(chunk))
            os.fsync(fd)
            os.replace(tmp, self.log_path)
            _fsync_dir(self.log_path)
        except BaseException:
            os.close(fd)
            raise
        os.close(self.fd)
        self.fd, self._lines, self._log_stale = fd, kept, False

    def close(self) -> None:
        os.fsync(self.fd)
        try:
            if self.parquet:
                self._write_parquet()
        finally:
            os.close(self.fd)  # releases the lock

    def _winners(self) -> Iterator[dict[str, Any]]:
        """The records of OUTPUT, each key once (its winning record), Parquet rows first."""
        if self.path.exists():
            for row, rec in enumerate(read_rows(self.path)):
                entry = self.entries.get(record_key(rec))
                if entry is not None and entry.pos == -row - 1:
                    yield rec
        with open(self.log_path, "rb") as f:
            for pos, raw in enumerate(f):
                rec = json.loads(raw)
                entry = self.entries.get(record_key(rec))
                if entry is not None and entry.pos == pos:
                    yield rec

    def _write_parquet(self) -> None:
        """Log + Parquet OUTPUT -> a new Parquet OUTPUT, then the log is removed. Each step is atomic,
        and a kill between them leaves records that the next run counts once (the log's win)."""
        if self._lines or self._parquet_stale or not self.path.exists():
            tmp = self._tmp(self.path)
            write_records(tmp, self._winners())
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            checkpoint("parquet-written")
            os.replace(tmp, self.path)
            _fsync_dir(self.path)
            checkpoint("parquet-replaced")
        self.log_path.unlink()
        _fsync_dir(self.path)
        checkpoint("log-removed")


def read_output(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of OUTPUT as the next run will see them, each key once (the later record wins),
    a Parquet job's partial log included; reads only, so it works on a job that is running or was killed."""
    path = Path(path)
    records: dict[str, dict[str, Any]] = {}
    if is_parquet(path) and path.exists():
        for rec in read_rows(path):
            records[record_key(rec)] = rec
    log_path = Path(f"{path}.partial.jsonl") if is_parquet(path) else path
    if log_path.exists():
        with open(log_path, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break
                try:
                    rec = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    break
                records[record_key(rec)] = rec
    return list(records.values())

"""Running a batch job: items streamed through the engine, results written as they finish."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from nextok.batch.files import ResultLog, count_input, generated_tokens, read_input
from nextok.batch.records import RETRYABLE_CODES, error_code, record
from nextok.batch.requests import BatchItem, parse_line, prepare
from nextok.params import SamplingParams


def run_items(llm, items: Iterable[BatchItem], max_in_flight: int = 256) -> Iterator[list[tuple[BatchItem, dict]]]:
    """Stream items through the engine; yields, after each step, the (item, record) pairs now finished.

    At most `max_in_flight` requests are in the engine at once, so memory stays flat however long
    the input is; new ones join as others finish (continuous batching over the whole input). A
    request that the engine refuses or that fails in it becomes its error record; the others go on.
    """
    engine = llm.engine
    pending = iter(items)
    in_flight: dict[int, tuple[Any, BatchItem]] = {}
    exhausted = False
    while True:
        done: list[tuple[BatchItem, dict]] = []
        while not exhausted and len(in_flight) < max_in_flight:
            item = next(pending, None)
            if item is None:
                exhausted = True
                break
            if item.error is None:
                try:
                    request = engine.add_request(item.prompt_token_ids, item.params, prompt=item.prompt,
                                                 request_id=str(item.id))
                except ValueError as e:  # a request that can never run: the line is at fault
                    item.error = ("invalid_request", str(e))
                except Exception as e:  # the engine's fault: a rerun tries again
                    item.error = ("server_error", f"{type(e).__name__}: {e}")
                else:
                    in_flight[id(request)] = (request, item)
                    continue
            done.append((item, _record(item, None, llm)))
        if in_flight:
            engine.step()
            for key in [k for k, (r, _) in in_flight.items() if r.is_finished]:
                request, item = in_flight.pop(key)
                done.append((item, _record(item, engine.output(request), llm)))
        if done:
            yield done
        if exhausted and not in_flight:
            return


def _record(item: BatchItem, output, llm) -> dict:
    """record(), where even a failure to build the record (a bug) ends this line alone."""
    try:
        return record(item, output, llm)
    except Exception as e:
        item.error = ("server_error", f"{type(e).__name__}: {e}")
        return record(item, None, llm)


@dataclass
class BatchSummary:
    """What a batch job did; str() is the summary line `nextok batch` prints."""

    total: int = 0  # records in OUTPUT at the end
    skipped: int = 0  # already in OUTPUT when the job started (and kept)
    completed: int = 0  # results written by this run
    redone: int = 0  # error records of an earlier run done again (retried, or their line changed)
    dropped: int = 0  # error records of an earlier run whose line is no longer in INPUT
    errors: Counter = field(default_factory=Counter)  # error records in OUTPUT at the end, by code
    generated_tokens: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        errors = ", ".join(f"{n} {code}" for code, n in sorted(self.errors.items())) or "none"
        redone = f", {self.redone} error records redone" if self.redone else ""
        redone += f", {self.dropped} dropped (their lines are no longer in INPUT)" if self.dropped else ""
        rate = self.generated_tokens / self.seconds if self.seconds else 0.0
        return (f"{self.total} records in OUTPUT ({self.skipped} from an earlier run, {self.completed} results now"
                f"{redone}); errors: {errors}; {self.generated_tokens} tokens in {self.seconds:.1f} s "
                f"({rate:.0f} tokens/s)")


def flags_salt(params: SamplingParams) -> str:
    """The job's sampling flags as text: part of each error record's input_hash, so new flags redo errors."""
    return json.dumps(params.to_dict(), sort_keys=True, default=str)


def redo_keys(log: ResultLog, input_path: str | os.PathLike, salt: str) -> tuple[set[str], set[str], int]:
    """(keys of error records to do again, keys of error records whose line left INPUT, number of input lines).

    An error record is kept only while its line is still in INPUT under its key, unchanged (same
    input_hash), and its error is the line's fault; retryable errors (server_error) are redone.
    """
    errors = {key: e for key, e in log.entries.items() if e.code is not None}
    if not errors:
        return set(), set(), count_input(input_path)
    redo: set[str] = set()
    keep: set[str] = set()
    seen: set[str] = set()
    lines = 0
    for raw, line in read_input(input_path):
        lines += 1
        item = parse_line(raw, line, seen, salt)
        if item.key != f"line:{line}" and f"line:{line}" in errors:
            redo.add(f"line:{line}")  # the line was invalid without a usable id, and now has one
        entry = errors.get(item.key)
        if entry is None:
            continue
        if entry.input_hash == item.input_hash and entry.code not in RETRYABLE_CODES:
            keep.add(item.key)
        else:
            redo.add(item.key)
    return redo, set(errors) - keep - redo, lines


def run_batch(llm, input_path: str | os.PathLike, output_path: str | os.PathLike, params: SamplingParams | None = None,
              max_in_flight: int = 256, progress: bool = True) -> BatchSummary:
    """Run (or resume) a batch job: every request of INPUT once in OUTPUT (JSONL, or Parquet by extension).

    Rerunning skips what OUTPUT already holds, except error records to redo (`redo_keys`): those of
    server errors, and those whose line changed. Requests without a seed get `request_seed(id)`, so
    the results do not depend on where a run was interrupted.
    """
    params = params or SamplingParams()
    salt = flags_salt(params)
    started = time.perf_counter()
    log = ResultLog(output_path)
    summary = BatchSummary()
    bar = None
    try:
        redo, gone, total = redo_keys(log, input_path, salt)
        summary.redone, summary.dropped = len(redo), len(gone)
        log.discard(redo | gone)
        summary.skipped = len(log.entries)
        seen: set[str] = set()

        def todo() -> Iterator[BatchItem]:
            for raw, line in read_input(input_path):
                item = parse_line(raw, line, seen, salt)
                if item.key not in log.entries:
                    yield prepare(item, llm, params)

        bar = tqdm(total=total, initial=min(summary.skipped, total), unit="req", desc="batch", disable=not progress,
                   dynamic_ncols=True, smoothing=0.1)
        for group in run_items(llm, todo(), max_in_flight):
            log.append([rec for _, rec in group])
            for _, rec in group:
                summary.generated_tokens += generated_tokens(rec)
                summary.completed += int(error_code(rec) is None)
            bar.update(len(group))
            elapsed = time.perf_counter() - started
            bar.set_postfix_str(f"{summary.generated_tokens / max(elapsed, 1e-9):.0f} tok/s", refresh=False)
    finally:
        if bar is not None:
            bar.close()
        log.close()
    summary.total = len(log.entries)
    summary.errors = log.error_codes()
    summary.seconds = time.perf_counter() - started
    return summary

"""Running a batch job: items streamed through the engine, results written as they finish."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from nextok.batch.files import ResultLog, count_input, generated_tokens, read_input
from nextok.batch.records import record
from nextok.batch.requests import BatchItem, parse_line, prepare
from nextok.params import SamplingParams


def run_items(llm, items: Iterable[BatchItem], max_in_flight: int = 256) -> Iterator[list[tuple[BatchItem, dict]]]:
    """Stream items through the engine; yields, after each step, the (item, record) pairs now finished.

    At most `max_in_flight` requests are in the engine at once, so memory stays flat however long
    the input is; new ones join as others finish (continuous batching over the whole input).
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
                except ValueError as e:
                    item.error = ("invalid_request", str(e))
                else:
                    in_flight[id(request)] = (request, item)
                    continue
            done.append((item, record(item, None, llm)))
        if in_flight:
            engine.step()
            for key in [k for k, (r, _) in in_flight.items() if r.is_finished]:
                request, item = in_flight.pop(key)
                done.append((item, record(item, engine.output(request), llm)))
        if done:
            yield done
        if exhausted and not in_flight:
            return

@dataclass
class BatchSummary:
    total: int = 0  # records in OUTPUT at the end
    skipped: int = 0  # already in OUTPUT when the job started
    completed: int = 0  # results written by this run
    errors: Counter = field(default_factory=Counter)  # error records in OUTPUT, by code
    generated_tokens: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        errors = ", ".join(f"{n} {code}" for code, n in sorted(self.errors.items())) or "none"
        rate = self.generated_tokens / self.seconds if self.seconds else 0.0
        return (f"{self.total} records in OUTPUT ({self.skipped} from an earlier run, {self.completed} results now); "
                f"errors: {errors}; {self.generated_tokens} tokens in {self.seconds:.1f} s ({rate:.0f} tokens/s)")


def run_batch(llm, input_path: str | os.PathLike, output_path: str | os.PathLike, params: SamplingParams | None = None,
              max_in_flight: int = 256, progress: bool = True) -> BatchSummary:
    """Run (or resume) a batch job: every request of INPUT once in OUTPUT (JSONL, or Parquet by extension).

    Rerunning after a crash skips what OUTPUT already holds. Requests without a seed get
    `request_seed(id)`, so the results do not depend on where a run was interrupted.
    """
    params = params or SamplingParams()
    started = time.perf_counter()
    log = ResultLog(output_path)
    summary = BatchSummary(skipped=len(log.keys), errors=Counter(log.error_codes))
    seen: set[str] = set()
    total = count_input(input_path) if progress else 0

    def todo() -> Iterator[BatchItem]:
        for raw, line in read_input(input_path):
            item = parse_line(raw, line, seen)
            if item.key not in log.keys:
                yield prepare(item, llm, params)

    bar = tqdm(total=total, initial=min(summary.skipped, total), unit="req", desc="batch", disable=not progress,
               dynamic_ncols=True, smoothing=0.1)
    try:
        for group in run_items(llm, todo(), max_in_flight):
            log.append([rec for _, rec in group])
            for item, rec in group:
                summary.generated_tokens += generated_tokens(rec)
                if item.error is not None:
                    summary.errors[item.error[0]] += 1
                else:
                    summary.completed += 1
            bar.update(len(group))
            elapsed = time.perf_counter() - started
            bar.set_postfix_str(f"{summary.generated_tokens / max(elapsed, 1e-9):.0f} tok/s", refresh=False)
    finally:
        bar.close()
        log.close()
    summary.total = len(log.keys)
    summary.seconds = time.perf_counter() - started
    return summary

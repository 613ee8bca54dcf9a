"""Batch jobs: every line of a JSONL or Parquet file through one continuously batched engine.

A result line is appended to OUTPUT as soon as its request finishes, in one write, so a killed job
leaves whole lines only; rerunning the same command skips the ids already in OUTPUT. Requests
without a `seed` get one derived from their id (`request_seed`), so a sampled request gives the
same text whether the job ran in one go or was resumed. Bad lines become error records.

Input lines: nextok's form `{"id", "prompt" | "prompt_token_ids" | "messages", SamplingParams
fields...}` or the OpenAI batch form `{"custom_id", "method", "url", "body"}` (answered in the
OpenAI batch output form). Ids are compared as strings.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from nextok.outputs import RequestOutput
from nextok.params import SamplingParams

OPENAI_URLS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
# OpenAI body keys that a batch answers without using.
_OPENAI_PASSIVE = {"model", "user", "metadata", "store", "service_tier", "prompt", "messages"}


def request_seed(request_id: Any) -> int:
    """The seed of a request that gives none: stable across runs, so a resumed job matches."""
    return int.from_bytes(hashlib.sha256(str(request_id).encode()).digest()[:4], "big") >> 1


@dataclass
class BatchItem:
    """One input line, parsed: a request to run, or the error record it becomes."""

    key: str  # what OUTPUT is deduplicated on: "id:<id>", or "line:<n>" for lines without a usable id
    id: Any
    line: int | None
    kind: str = "nextok"  # "nextok", or the OpenAI endpoint: "completions" / "chat"
    prompt: str | None = None
    prompt_token_ids: list[int] = field(default_factory=list)
    params: SamplingParams | None = None
    model: str | None = None
    error: tuple[str, str] | None = None  # (code, message)
    raw: dict | None = field(default=None, repr=False)  # the parsed line, until prepare() builds the request


class MissingPrompt(ValueError):
    pass


def _where(line: int | None) -> str:
    return f"line {line}" if line is not None else "a line"


def parse_line(raw: bytes | str | dict, line: int | None, seen: set[str] | None = None) -> BatchItem:
    """Identify one input line (cheap: no tokenizing); `seen` collects keys to catch duplicate ids."""
    if isinstance(raw, dict):
        obj = {k: v for k, v in raw.items() if v is not None}  # Parquet rows: absent columns are null
    else:
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return BatchItem(f"line:{line}", None, line, error=("invalid_json", f"{_where(line)} is not JSON: {e}"))
    if not isinstance(obj, dict):
        return BatchItem(f"line:{line}", None, line, error=("invalid_json", f"{_where(line)} is not a JSON object"))
    kind = "nextok"
    if "custom_id" in obj or "body" in obj:
        kind = OPENAI_URLS.get(obj.get("url"), "completions")
    request_id = obj.get("custom_id" if kind != "nextok" else "id")
    if request_id is None or isinstance(request_id, (dict, list)):
        name = "custom_id" if kind != "nextok" else "id"
        return BatchItem(f"line:{line}", None, line, kind, error=("missing_id", f"{_where(line)} has no {name!r}"))
    key = f"id:{request_id}"
    if seen is not None:
        if key in seen:
            return BatchItem(f"line:{line}", request_id, line, kind,
                             error=("duplicate_id", f"id {request_id!r} ({_where(line)}) appeared on an earlier line"))
        seen.add(key)
    return BatchItem(key, request_id, line, kind, raw=obj)


def prepare(item: BatchItem, llm, base: SamplingParams) -> BatchItem:
    """Tokenize the prompt and build the SamplingParams; problems become the item's error."""
    obj, item.raw = item.raw, None
    if item.error is not None or obj is None:
        return item
    try:
        if item.kind == "nextok":
            fields = {k: v for k, v in obj.items() if k not in ("id", "prompt", "prompt_token_ids", "messages")}
            source = obj
        else:
            if obj.get("url") not in OPENAI_URLS:
                raise ValueError(f"url {obj.get('url')!r} is not supported: use one of {', '.join(OPENAI_URLS)}")
            source = obj.get("body")
            if not isinstance(source, dict):
                raise ValueError("'body' must be a JSON object")
            item.model = source.get("model")
            fields = _openai_fields(source, chat=item.kind == "chat")
        item.prompt, item.prompt_token_ids = _prompt(source, llm, chat_only=item.kind == "chat")
        params = SamplingParams.from_dict({**base.to_dict(), **fields})
        if params.seed is None:
            params = params.replace(seed=request_seed(item.id))
        item.params = params.with_model_defaults(llm.generation_config)
    except (ValueError, TypeError) as e:
        item.error = ("missing_prompt" if isinstance(e, MissingPrompt) else "invalid_parameter", str(e))
    except Exception as e:  # e.g. a chat template rejecting the messages: one bad line must not stop the job
        item.error = ("invalid_request", f"{type(e).__name__}: {e}")
    return item


def _prompt(source: dict, llm, chat_only: bool) -> tuple[str | None, list[int]]:
    if chat_only or "messages" in source:
        messages = source.get("messages")
        if not isinstance(messages, list) or not messages:
            raise MissingPrompt("no prompt: give 'messages', a non-empty list of {role, content}")
        text = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return text, llm.tokenizer.encode(text)
    prompt = source.get("prompt")
    if prompt is None:
        prompt = source.get("prompt_token_ids")
    if isinstance(prompt, str):
        return prompt, llm.tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return None, list(prompt)
    if isinstance(prompt, list) and prompt:
        raise ValueError("'prompt' holds several prompts: put one prompt per line")
    raise MissingPrompt("no prompt: give 'prompt' (text), 'prompt_token_ids' or 'messages'")


def _openai_fields(body: dict, chat: bool) -> dict[str, Any]:
    """OpenAI request body -> SamplingParams fields, with OpenAI's defaults (sampling at temperature 1, no top-k)."""
    names = set(SamplingParams.field_names())
    fields: dict[str, Any] = {"top_k": 0}
    for key, value in body.items():
        if key in _OPENAI_PASSIVE:
            continue
        if key in ("max_tokens", "max_completion_tokens"):
            fields["max_new_tokens"] = value
        elif key == "n":
            fields["num_return_sequences"] = value
        elif key == "logprobs":
            if not chat and value is not None:
                fields["logprobs"] = value
            elif value:
                fields.setdefault("logprobs", 0)
        elif key == "top_logprobs":
            fields["logprobs"] = value
        elif key == "stream" and value:
            raise ValueError("'stream' is not available in a batch")
        elif key in names:
            fields[key] = value
        elif key != "stream":
            raise ValueError(f"body field {key!r} is not supported in a batch")
    temperature = body.get("temperature", 1.0)
    if "do_sample" not in body:
        fields["do_sample"] = temperature != 0
    if temperature == 0:
        fields.pop("temperature", None)
    return fields


# ---------------------------------------------------------------------------- records
def record(item: BatchItem, output: RequestOutput | None, llm=None) -> dict[str, Any]:
    """The OUTPUT line for an item: its result, or its error. Records keyed by line carry "line"."""
    if item.kind != "nextok":
        return _openai_record(item, output, llm)
    rec: dict[str, Any] = {"id": item.id, "prompt": item.prompt}
    if output is not None:
        rec["outputs"] = [
            {"index": c.index, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
             "score": c.score, "logprobs": c.logprobs} for c in output.outputs
        ]
    rec["error"] = None if item.error is None else {"code": item.error[0], "message": item.error[1]}
    if item.key.startswith("line:"):
        rec["line"] = item.line
    return rec


def record_key(rec: dict[str, Any]) -> str:
    if rec.get("line") is not None:
        return f"line:{rec['line']}"
    return f"id:{rec['custom_id'] if 'custom_id' in rec else rec['id']}"


def _openai_record(item: BatchItem, output: RequestOutput | None, llm) -> dict[str, Any]:
    digest = hashlib.sha256(str(item.key).encode()).hexdigest()[:24]
    rec: dict[str, Any] = {"id": f"batch_req_{digest}", "custom_id": item.id, "response": None, "error": None}
    if item.key.startswith("line:"):
        rec["line"] = item.line
        rec["error"] = {"code": item.error[0], "message": item.error[1]}
    elif item.error is not None:
        rec["response"] = {"status_code": 400, "request_id": f"req_{digest}", "body": {"error": {
            "message": item.error[1], "type": "invalid_request_error", "param": None, "code": item.error[0]}}}
    else:
        chat = item.kind == "chat"
        choices = []
        for c in output.outputs:
            choice: dict[str, Any] = {"index": c.index}
            if chat:
                choice["message"] = {"role": "assistant", "content": c.text}
            else:
                choice["text"] = c.text
            choice["logprobs"] = _openai_logprobs(c, llm.tokenizer, chat) if c.logprobs is not None else None
            choice["finish_reason"] = c.finish_reason
            choices.append(choice)
        completion_tokens = sum(len(c.token_ids) for c in output.outputs)
        prompt_tokens = len(output.prompt_token_ids)
        rec["response"] = {"status_code": 200, "request_id": f"req_{digest}", "body": {
            "id": ("chatcmpl-" if chat else "cmpl-") + digest, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": item.model or llm.model_name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}}
    return rec


def _openai_logprobs(c, tokenizer, chat: bool) -> dict[str, Any]:
    tokens = [tokenizer.token_to_str(t) for t in c.token_ids]
    chosen = [step.get(t) for t, step in zip(c.token_ids, c.logprobs)]
    top = [{tokenizer.token_to_str(t): lp for t, lp in step.items()} for step in c.logprobs]
    if chat:
        return {"content": [{"token": tok, "logprob": lp, "top_logprobs": [
            {"token": a, "logprob": b} for a, b in alts.items()]} for tok, lp, alts in zip(tokens, chosen, top)]}
    offsets, at = [], 0
    for tok in tokens:
        offsets.append(at)
        at += len(tok)
    return {"tokens": tokens, "token_logprobs": chosen, "top_logprobs": top, "text_offset": offsets}


def to_json_line(rec: dict[str, Any]) -> bytes:
    return (json.dumps(rec, ensure_ascii=False) + "\n").encode()


# ---------------------------------------------------------------------------- running
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
                summary.generated_tokens += _generated_tokens(rec)
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


def _generated_tokens(rec: dict[str, Any]) -> int:
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


# ---------------------------------------------------------------------------- command line
def register_batch_command(sub) -> None:
    """Add `nextok batch` to the CLI's subparsers."""
    from nextok.cli import add_model_flags, add_sampling_flags

    p = sub.add_parser(
        "batch", help="generate for every line of a JSONL / Parquet file; resumable",
        description="Generate for every request of INPUT (JSONL or Parquet; nextok's form or the OpenAI batch "
                    "form) and write one result per request to OUTPUT, keyed by id, as requests finish. Rerun the "
                    "same command after a crash to finish the rest. Flags set defaults that each line may override. "
                    "A request without a seed is seeded from its id, so sampled results are the same whether the "
                    "job ran in one go or was resumed.")
    p.add_argument("input", help="JSONL or .parquet file (with --ray: any path or folder Ray Data reads)")
    p.add_argument("output", help="JSONL or .parquet file (with --ray: a folder)")
    p.add_argument("--max-in-flight", type=int, default=256, help="requests in the engine at once (default: 256)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    ray = p.add_argument_group("Ray (a cluster: set RAY_ADDRESS, or a local Ray is started)")
    ray.add_argument("--ray", action="store_true", help="run on Ray Data: a pool of actors, each with an engine")
    ray.add_argument("--replicas", type=int, default=1, help="actors in the pool (default: 1)")
    ray.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor (default: 0)")
    ray.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per actor (default: 1)")
    ray.add_argument("--ray-batch-size", type=int, default=64, help="requests per actor call (default: 64)")
    add_model_flags(p)
    add_sampling_flags(p)
    p.set_defaults(func=_batch_command)


def _batch_command(args: argparse.Namespace) -> int:
    from nextok.cli import load_llm, sampling_params_from_args

    params = sampling_params_from_args(args)
    if args.max_in_flight < 1:
        raise ValueError(f"--max-in-flight={args.max_in_flight} is invalid: use 1 or more")
    if args.ray:
        from nextok.ray import run_ray_batch

        memory = None if args.kv_cache_gb is None else int(args.kv_cache_gb * (1 << 30))
        run_ray_batch(args.input, args.output, model=args.model, params=params, replicas=args.replicas,
                      num_cpus=args.num_cpus, num_gpus=args.num_gpus, batch_size=args.ray_batch_size,
                      dtype=args.dtype, device=args.device, kv_cache_memory=memory)
        print(f"nextok: wrote {args.output}", file=sys.stderr)
        return 0
    if not Path(args.input).is_file():
        raise FileNotFoundError(f"no input file {args.input!r}")
    summary = run_batch(load_llm(args), args.input, args.output, params, args.max_in_flight,
                        progress=not args.no_progress)
    print(f"nextok: {summary}", file=sys.stderr)
    return 0

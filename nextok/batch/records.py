"""Result records of a batch job, in nextok's form or the OpenAI batch output form.

Every line gets one record: its result, or its error. Error codes say whether a rerun tries the
line again: `server_error` (the engine failed while running it) is retried; the others (the line
itself is wrong: invalid_json, missing_id, duplicate_id, missing_prompt, invalid_parameter,
invalid_request) are kept until the line changes. Error records carry `input_hash`, a hash of the
line (and of the job's sampling flags), which is how a rerun sees that a line was changed.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from nextok.batch.requests import BatchItem
from nextok.outputs import RequestOutput

# Errors of the engine, not of the line: a rerun tries the line again.
RETRYABLE_CODES = frozenset({"server_error"})


def engine_error(output: RequestOutput | None) -> tuple[str, str] | None:
    """(code, message) of a request that failed inside the engine, else None."""
    if output is None or output.error is None:
        return None
    return ("server_error" if output.error_type == "server_error" else "invalid_request", output.error)


def record(item: BatchItem, output: RequestOutput | None, llm=None) -> dict[str, Any]:
    """The OUTPUT line for an item: its result, or its error. Records keyed by line carry "line"."""
    if item.error is None and (failed := engine_error(output)) is not None:
        item.error = failed
    if item.kind != "nextok":
        return _openai_record(item, output, llm)
    rec: dict[str, Any] = {"id": item.id, "prompt": item.prompt}
    if output is not None and item.error is None:
        rec["outputs"] = [
            {"index": c.index, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
             "score": c.score, "logprobs": c.logprobs} for c in output.outputs
        ]
    rec["error"] = None if item.error is None else {"code": item.error[0], "message": item.error[1]}
    return _tail(rec, item)


def _tail(rec: dict[str, Any], item: BatchItem) -> dict[str, Any]:
    if item.key.startswith("line:"):
        rec["line"] = item.line
    if item.error is not None and item.input_hash is not None:
        rec["input_hash"] = item.input_hash
    return rec


def record_key(rec: dict[str, Any]) -> str:
    """What OUTPUT is deduplicated on: "id:<id>", or "line:<n>" for a line without a usable id."""
    if rec.get("line") is not None:
        return f"line:{rec['line']}"
    return f"id:{rec['custom_id'] if 'custom_id' in rec else rec['id']}"


def error_code(rec: dict[str, Any]) -> str | None:
    """The error code of a record of either form, or None for a result."""
    if rec.get("error"):
        return rec["error"]["code"]
    response = rec.get("response") or {}
    if response.get("status_code", 200) != 200:
        return response["body"]["error"]["code"]
    return None


def _openai_record(item: BatchItem, output: RequestOutput | None, llm) -> dict[str, Any]:
    digest = hashlib.sha256(str(item.key).encode()).hexdigest()[:24]
    rec: dict[str, Any] = {"id": f"batch_req_{digest}", "custom_id": item.id, "response": None, "error": None}
    if item.key.startswith("line:"):
        rec["error"] = {"code": item.error[0], "message": item.error[1]}
    elif item.error is not None:
        server = item.error[0] in RETRYABLE_CODES
        rec["response"] = {"status_code": 500 if server else 400, "request_id": f"req_{digest}", "body": {"error": {
            "message": item.error[1], "type": "server_error" if server else "invalid_request_error", "param": None,
            "code": item.error[0]}}}
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
    return _tail(rec, item)


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

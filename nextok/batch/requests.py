"""Input lines of a batch job: parsing (nextok and OpenAI batch forms) and preparing requests."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from nextok.chat import chat_prompt
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
    input_hash: str | None = None  # of the line's content (and the job's flags): a rerun sees a changed line
    raw: dict | None = field(default=None, repr=False)  # the parsed line, until prepare() builds the request


class MissingPrompt(ValueError):
    pass


def _where(line: int | None) -> str:
    return f"line {line}" if line is not None else "a line"


def input_hash(raw: bytes | str | dict, salt: str = "") -> str:
    """A short hash of a line's content (a Parquet row: its non-null fields), and of `salt` (the job's flags)."""
    if isinstance(raw, dict):
        data = json.dumps({k: v for k, v in raw.items() if v is not None}, sort_keys=True, ensure_ascii=False,
                          default=str).encode()
    else:
        data = (raw.encode() if isinstance(raw, str) else bytes(raw)).strip()
    return hashlib.sha256(salt.encode() + b"\0" + data).hexdigest()[:16]


def parse_line(raw: bytes | str | dict, line: int | None, seen: set[str] | None = None, salt: str = "") -> BatchItem:
    """Identify one input line (cheap: no tokenizing); `seen` collects keys to catch duplicate ids.

    The item carries `input_hash(raw, salt)`, which error records keep.
    """
    item = _parse(raw, line, seen)
    item.input_hash = input_hash(raw, salt)
    return item


def _parse(raw: bytes | str | dict, line: int | None, seen: set[str] | None) -> BatchItem:
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
        item.prompt, item.prompt_token_ids, stops = _prompt(source, llm, chat_only=item.kind == "chat")
        params = SamplingParams.from_dict({**base.to_dict(), **fields})
        if stops:
            params = params.replace(stop_token_ids=[*params.stop_token_ids, *stops])
        if params.seed is None:
            params = params.replace(seed=request_seed(item.id))
        item.params = params.with_model_defaults(llm.generation_config)
    except (ValueError, TypeError) as e:
        item.error = ("missing_prompt" if isinstance(e, MissingPrompt) else "invalid_parameter", str(e))
    except Exception as e:  # e.g. a chat template rejecting the messages: one bad line must not stop the job
        item.error = ("invalid_request", f"{type(e).__name__}: {e}")
    return item


def _prompt(source: dict, llm, chat_only: bool) -> tuple[str | None, list[int], list[int]]:
    """(prompt text, prompt token ids, extra stop token ids) of a line."""
    if chat_only or "messages" in source:
        messages = source.get("messages")
        if not isinstance(messages, list) or not messages:
            raise MissingPrompt("no prompt: give 'messages', a non-empty list of {role, content}")
        chat = chat_prompt(llm.tokenizer, messages, llm.eos_token_ids)
        return chat.text, chat.token_ids, chat.stop_token_ids
    prompt = source.get("prompt")
    if prompt is None:
        prompt = source.get("prompt_token_ids")
    if isinstance(prompt, str):
        if llm.tokenizer is None:
            raise ValueError("this model has no tokenizer: give 'prompt_token_ids' instead of text")
        return prompt, llm.tokenizer.encode(prompt), []
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return None, list(prompt), []
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

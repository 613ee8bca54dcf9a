"""OpenAI request bodies -> engine work: prompt token ids and SamplingParams, with API-shaped errors."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from nextok.chat import chat_prompt
from nextok.params import SamplingParams
from nextok.server.errors import ApiError, bad_request
from nextok.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from nextok.server.settings import ServerSettings

# SamplingParams field -> the request field a client sent it as, so errors name what the client wrote.
_PARAM_NAMES = {"max_new_tokens": "max_tokens", "num_return_sequences": "n", "min_new_tokens": "min_tokens",
                "do_sample": "temperature"}
_NEXTOK_FIELDS = ("top_k", "min_p", "repetition_penalty", "no_repeat_ngram_size", "num_beams", "length_penalty",
                  "early_stopping", "ignore_eos", "top_p", "seed", "presence_penalty", "frequency_penalty")


@dataclass
class Work:
    """One prompt of a request, ready for `LLMEngine.add_request`."""

    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None


@dataclass
class ServedModel:
    """What request translation needs to know about the model behind the server."""

    name: str
    tokenizer: Any
    max_model_len: int
    eos_token_ids: list[int]
    generation_config: dict = field(default_factory=dict)

    @classmethod
    def from_llm(cls, llm, name: str | None = None) -> ServedModel:
        return cls(name=name or llm.model_name, tokenizer=llm.tokenizer, max_model_len=llm.model.max_positions,
                   eos_token_ids=list(llm.eos_token_ids), generation_config=dict(llm.generation_config or {}))


# ---------------------------------------------------------------------- requests
def check_model(requested: str | None, model: ServedModel) -> None:
    if requested is not None and requested != model.name:
        raise ApiError(404, f"The model {requested!r} does not exist; this server serves {model.name!r}.",
                       param="model", code="model_not_found")


def completion_work(body: CompletionRequest, model: ServedModel, settings: ServerSettings) -> list[Work]:
    check_model(body.model, model)
    prompts = _prompt_list(body.prompt, settings)
    if any(isinstance(p, str) for p in prompts) and model.tokenizer is None:
        raise bad_request("This model has no tokenizer: send the prompt as token ids.", param="prompt")
    ids = [model.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    if body.echo:
        raise bad_request("echo is not supported.", param="echo")
    work = []
    for text, tokens in zip(prompts, ids):
        params = sampling_params(body, tokens, model, settings, default_max_tokens=16, logprobs=body.logprobs)
        work.append(Work(tokens, params, text if isinstance(text, str) else None))
    return work


def chat_work(body: ChatCompletionRequest, model: ServedModel, settings: ServerSettings) -> list[Work]:
    check_model(body.model, model)
    if model.tokenizer is None or not model.tokenizer.chat_template:
        raise bad_request("This model has no chat template: use /v1/completions.", param="messages")
    messages = [{"role": m.role, "content": _message_text(m.content, i)} for i, m in enumerate(body.messages)]
    try:
        chat = chat_prompt(model.tokenizer, messages, model.eos_token_ids)
    except ValueError as e:
        raise bad_request(f"{str(e)[:1].upper()}{str(e)[1:]}.", param="messages") from None
    prompt, tokens = chat.text, chat.token_ids
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs: true.", param="top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    if body.max_completion_tokens is not None:
        body = body.model_copy(update={"max_tokens": body.max_completion_tokens})
    params = sampling_params(body, tokens, model, settings, default_max_tokens=None, logprobs=logprobs,
                             extra_stop_token_ids=chat.stop_token_ids)
    return [Work(tokens, params, prompt)]


def _prompt_list(prompt: Any, settings: ServerSettings) -> list[str | list[int]]:
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        prompts = [list(prompt)]
    else:
        prompts = list(prompt)
    if not prompts:
        raise bad_request("The prompt is empty: give a string or a non-empty list.", param="prompt")
    if len(prompts) > settings.max_prompts:
        raise bad_request(f"{len(prompts)} prompts in one request; this server takes at most {settings.max_prompts}.",
                          param="prompt")
    return prompts


def _message_text(content: str | list[dict] | None, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise bad_request("Only text content parts are supported.", param=f"messages[{index}].content")
        parts.append(part["text"])
    return "".join(parts)


def sampling_params(body: SamplingFields, prompt_token_ids: list[int], model: ServedModel, settings: ServerSettings,
                    default_max_tokens: int | None, logprobs: int | None,
                    extra_stop_token_ids: list[int] | None = None) -> SamplingParams:
    """SamplingParams for one prompt; limits that depend on the prompt are checked here."""
    n = body.n or 1
    size = len(prompt_token_ids)
    if size == 0:
        raise bad_request("The prompt is empty: give at least one token.", param="prompt")
    room = model.max_model_len - size
    if room <= 0:
        raise bad_request(f"This model's maximum context length is {model.max_model_len} tokens, but the prompt "
                          f"has {size} tokens. Shorten the prompt.", param="prompt", code="context_length_exceeded")
    max_tokens = body.max_tokens
    if max_tokens is None:
        max_tokens = room if default_max_tokens is None else min(default_max_tokens, room)
        if settings.max_tokens_limit is not None:
            max_tokens = min(max_tokens, settings.max_tokens_limit)
    elif size + max_tokens > model.max_model_len:
        raise bad_request(f"This model's maximum context length is {model.max_model_len} tokens; the prompt has "
                          f"{size} and max_tokens asks for {max_tokens}. Lower max_tokens to at most {room}.",
                          param="max_tokens", code="context_length_exceeded")
    elif settings.max_tokens_limit is not None and max_tokens > settings.max_tokens_limit:
        raise bad_request(f"max_tokens={max_tokens} is over this server's limit of {settings.max_tokens_limit}.",
                          param="max_tokens")
    if n > settings.max_n:
        raise bad_request(f"n={n} is over this server's limit of {settings.max_n}.", param="n")
    if body.num_beams is not None and body.num_beams > settings.max_n:
        raise bad_request(f"num_beams={body.num_beams} is over this server's limit of {settings.max_n}.",
                          param="num_beams")

    values: dict[str, Any] = {name: getattr(body, name) for name in _NEXTOK_FIELDS if getattr(body, name) is not None}
    # Fields the request leaves out come from the model's generation_config.json, as in LLM.generate.
    for name in ("top_k", "top_p", "min_p", "repetition_penalty", "no_repeat_ngram_size", "length_penalty",
                 "early_stopping", "num_beams"):
        if name not in values and model.generation_config.get(name) is not None:
            values[name] = model.generation_config[name]
    if values.get("top_k") == -1:
        values["top_k"] = 0
    if body.temperature is not None:
        values["temperature"] = body.temperature if body.temperature > 0 else 1.0
        values["do_sample"] = body.temperature > 0
    elif body.num_beams is not None and body.num_beams > 1:
        values["do_sample"] = False  # beam search asked for without a temperature: the classic, deterministic one
    else:  # OpenAI's default temperature is 1: sample
        values["temperature"] = float(model.generation_config.get("temperature") or 1.0)
        values["do_sample"] = bool(model.generation_config.get("do_sample", True))
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    stop_ids = list(body.stop_token_ids or []) + [t for t in extra_stop_token_ids or [] if t not in
                                                  (body.stop_token_ids or [])]
    try:
        return SamplingParams(max_new_tokens=max_tokens, min_new_tokens=body.min_tokens or 0,
                              num_return_sequences=n, stop=stop, stop_token_ids=stop_ids, logprobs=logprobs,
                              **values)
    except ValueError as e:
        raise bad_request(api_message(str(e)), param=param_of(str(e))) from None


def param_of(message: str) -> str | None:
    """The request field a SamplingParams error is about (as the client named it), or None."""
    match = re.match(r"SamplingParams\.(\w+)\b", message)
    if match is None:
        return None
    name = match.group(1)
    return _PARAM_NAMES.get(name, name)


def api_message(message: str) -> str:
    """A SamplingParams error in the request's own words: `max_tokens: SamplingParams.max_new_tokens=...`."""
    for internal, public in _PARAM_NAMES.items():
        message = message.replace(f"SamplingParams.{internal}=", f"{public}: SamplingParams.{internal}=")
    if "greedy decoding gives one sequence" in message:
        message += " (with temperature 0, n must be 1; use temperature > 0 or num_beams >= n)"
    return message

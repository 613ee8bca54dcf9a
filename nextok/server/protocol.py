"""The request and response bodies of the OpenAI-compatible API, as pydantic models.

Request models drive validation (a wrong type or a value out of range is a 422) and the OpenAPI
schema. Responses are built as plain dicts by `responses.py` for speed; the response models here
document them in the schema.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

Prompt = str | list[str] | list[int] | list[list[int]]
# A stop string is held back from a stream until it cannot match, and each one is checked at every
# token: bounded, so one request cannot stall the others' steps or hold its whole text back.
MAX_STOPS = 64
MAX_STOP_CHARS = 1000
StopText = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
Stop = StopText | Annotated[list[StopText], Field(max_length=MAX_STOPS)] | None
# How a choice ended: "timeout" when the server's time limit cut it. A request that fails is answered
# with an error object (a stream: an error chunk), never with a choice.
FinishReason = Literal["stop", "length", "timeout"]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error: `{"error": {"message", "type", "param", "code"}}`, as the OpenAI API sends it."""

    error: ErrorDetail


class StreamOptions(BaseModel):
    include_usage: bool = False


class NextokFields(BaseModel):
    """nextok's decoding fields, sent in the same body (the OpenAI client's `extra_body`)."""

    model_config = ConfigDict(extra="ignore")

    top_k: int | None = Field(None, ge=-1, description="sample among the k most likely tokens; 0 or -1: off")
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    no_repeat_ngram_size: int | None = Field(None, ge=0, le=64)
    num_beams: int | None = Field(None, ge=1, le=64, description="beam search with this many beams")
    length_penalty: float | None = Field(None, ge=-100, le=100)
    early_stopping: bool | Literal["never"] | None = None
    min_tokens: int | None = Field(None, ge=0, description="suppress end tokens until this many are generated")
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=64)


class SamplingFields(NextokFields):
    """The OpenAI fields both endpoints share."""

    model: str | None = Field(None, description="the served model's id (GET /v1/models); default: that model")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most")
    temperature: float | None = Field(None, ge=0, le=2, description="0: greedy decoding; > 0: sampling")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(1, ge=1, le=128, description="completions per prompt")
    stop: Stop = Field(None, description="stop when one of these strings appears")
    seed: int | None = Field(None, ge=0, lt=2**63)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, body: Any) -> Any:
        check_unicode(body)
        return body


class CompletionRequest(SamplingFields):
    prompt: Prompt = Field(description="text, a list of texts, token ids, or a list of token id lists")
    logprobs: int | None = Field(None, ge=0, le=20, description="top alternatives per generated token")
    echo: bool | None = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")


# ---------------------------------------------------------------------- responses (for the schema)
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nextok"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    pending_requests: int
    kv_blocks_used: int
    kv_blocks_total: int
    steps: int
    peak_batch: int


# ---------------------------------------------------------------------- text that is not Unicode
def check_unicode(body: Any) -> None:
    """Refuse a body holding a lone surrogate anywhere (a value or a key), such as the escaped "\\ud800":
    JSON can write one but UTF-8 cannot, so the tokenizer and every response would fail on it.

    Raises PydanticCustomError "invalid_unicode", whose context names the field (a 400 for the app).
    Iterative, so a deeply nested body cannot exhaust the stack.
    """
    stack: list[tuple[tuple, Any]] = [((), body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str):
                    _check_text(key, path, "a key in ")
                stack.append((path + (key,), item))
        elif isinstance(value, list):
            stack.extend((path + (i,), item) for i, item in enumerate(value) if isinstance(item, (str, dict, list)))


def _check_text(text: str, path: tuple, what: str = "") -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        param = field_name(path)
        raise PydanticCustomError(
            "invalid_unicode",
            "{what}{param}: the text holds a lone surrogate ({char} at character {position}), which is not valid "
            "Unicode; send UTF-8 text (an escaped surrogate such as \\ud83d must be followed by its pair)",
            {"what": what, "param": param, "char": f"\\u{ord(text[e.start]):04x}", "position": e.start},
        ) from None


def field_name(path: tuple) -> str:
    """A location in the body as a client writes it: messages[0].content."""
    name = ""
    for part in path:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "body"

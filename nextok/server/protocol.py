"""The request and response bodies of the OpenAI-compatible API, as pydantic models.

Request models drive validation (a wrong type or a value out of range is a 422) and the OpenAPI
schema. Responses are built as plain dicts by `responses.py` for speed; the response models here
document them in the schema.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Prompt = str | list[str] | list[int] | list[list[int]]
Stop = str | list[str] | None


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
    finish_reason: Literal["stop", "length"] | None = None


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
    finish_reason: Literal["stop", "length"] | None = None


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

"""Engine results -> OpenAI response bodies and server-sent-event chunks (plain dicts, for speed)."""

from __future__ import annotations

import math
import time
import uuid

from nextok.outputs import RequestOutput
from nextok.server.errors import json_bytes
from nextok.server.events import Delta


def sse(data: dict | str) -> bytes:
    """One server-sent event: `data: JSON` (or `data: [DONE]`) and a blank line."""
    body = data.encode() if isinstance(data, str) else json_bytes(data)
    return b"data: " + body + b"\n\n"


def usage(outputs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class ResponseWriter:
    """Writes one request's response: whole, or chunk by chunk while it streams.

    chat: chat.completion bodies (message / delta) instead of text_completion ones.
    logprobs: whether the client asked for log-probabilities (then they are in every choice).
    """

    def __init__(self, model: str, tokenizer, n: int, chat: bool, logprobs: bool) -> None:
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model, self.tokenizer, self.n, self.chat, self.logprobs = model, tokenizer, n, chat, logprobs
        self._offsets: dict[int, int] = {}  # choice -> characters so far (the legacy text_offset)
        self._started: set[int] = set()  # chat choices whose first chunk (with the role) was sent

    # ------------------------------------------------------------------ whole responses
    def response(self, outputs: list[RequestOutput]) -> dict:
        choices = []
        for p, output in enumerate(outputs):
            for c in sorted(output.outputs, key=lambda c: c.index)[:self.n]:
                index = p * self.n + c.index
                logprobs = self._logprobs(index, c.token_ids, c.logprobs) if self.logprobs else None
                if self.chat:
                    choices.append({"index": index, "message": {"role": "assistant", "content": c.text},
                                    "logprobs": logprobs, "finish_reason": c.finish_reason})
                else:
                    choices.append({"index": index, "text": c.text, "logprobs": logprobs,
                                    "finish_reason": c.finish_reason})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": usage(outputs)}

    # ------------------------------------------------------------------ streaming
    def chunk(self, delta: Delta) -> dict | None:
        """The chunk for a Delta, or None when it carries nothing to send."""
        index = delta.prompt_index * self.n + delta.index
        logprobs = self._logprobs(index, delta.token_ids, delta.logprobs) if self.logprobs and delta.token_ids \
            else None
        first = self.chat and index not in self._started
        if not delta.text and delta.finish_reason is None and logprobs is None and not first:
            return None
        if self.chat:
            self._started.add(index)
            message = {"role": "assistant", "content": delta.text} if first else {"content": delta.text}
            if not delta.text and not first:
                message = {}
            choice = {"index": index, "delta": message, "logprobs": logprobs, "finish_reason": delta.finish_reason}
        else:
            choice = {"index": index, "text": delta.text, "logprobs": logprobs, "finish_reason": delta.finish_reason}
        return self._envelope([choice])

    def usage_chunk(self, outputs: list[RequestOutput]) -> dict:
        return {**self._envelope([]), "usage": usage(outputs)}

    def _envelope(self, choices: list[dict]) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices}

    # ------------------------------------------------------------------ log-probabilities
    def _logprobs(self, index: int, token_ids: list[int], logprobs: list[dict[int, float]] | None) -> dict | None:
        if logprobs is None:
            return None
        if self.chat:
            content = []
            for token, top in zip(token_ids, logprobs):
                content.append({**self._entry(token, _finite(top.get(token, 0.0))),
                                "top_logprobs": [self._entry(t, _finite(lp)) for t, lp in top.items()]})
            return {"content": content}
        tokens, chosen, tops, offsets = [], [], [], []
        offset = self._offsets.get(index, 0)
        for token, top in zip(token_ids, logprobs):
            text = self.tokenizer.token_to_str(token)
            tokens.append(text)
            chosen.append(_finite(top.get(token, 0.0)))
            tops.append({self.tokenizer.token_to_str(t): _finite(lp) for t, lp in top.items()})
            offsets.append(offset)
            offset += len(text)
        self._offsets[index] = offset
        return {"tokens": tokens, "token_logprobs": chosen, "top_logprobs": tops, "text_offset": offsets}

    def _entry(self, token: int, logprob: float) -> dict:
        text = self.tokenizer.token_to_str(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _finite(logprob: float) -> float:
    """JSON has no -Infinity: an impossible token gets a very low finite log-probability."""
    return logprob if math.isfinite(logprob) else -9999.0

"""Chat messages -> the prompt a model reads: the one rule every way in uses (LLM.chat, `generate --chat`,
batch `messages` lines and the server's /v1/chat/completions).

The model's chat template renders the conversation; the text is tokenized without the tokenizer's own
special tokens, as transformers' `apply_chat_template(tokenize=True)` does, and then a tokenizer that
adds a BOS (`add_bos_token`, as llama.cpp's GGUF files say for Llama) gets exactly one: the template's
own if it wrote one, else one in front. The token that ends an assistant turn (`<|im_end|>`,
`<|eot_id|>`, ...) stops generation even where the model's EOS is another token.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

_end_of_turn: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> its end-of-turn id


@dataclass
class ChatPrompt:
    text: str  # the rendered template
    token_ids: list[int]
    stop_token_ids: list[int] = field(default_factory=list)  # end-of-turn tokens that are not an EOS


def chat_prompt(tokenizer: Any, messages: list[dict], eos_token_ids: list[int] | None = None) -> ChatPrompt:
    """Render and tokenize one conversation, ready for the assistant's turn.

    Raises ValueError where the model has no chat template or the template rejects the messages.
    """
    if tokenizer is None:
        raise ValueError("this model has no tokenizer: chat messages need one; pass prompt token ids instead")
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content}")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except ValueError:
        raise
    except Exception as e:  # the template's own checks (raise_exception), e.g. roles out of order
        raise ValueError(f"the chat template rejected these messages: {e}") from None
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    if tokenizer.add_bos_token and bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    end = end_of_turn_token_id(tokenizer)
    stops = [end] if end is not None and end not in (eos_token_ids or tokenizer.eos_token_ids) else []
    return ChatPrompt(text=text, token_ids=ids, stop_token_ids=stops)


def end_of_turn_token_id(tokenizer: Any) -> int | None:
    """The special token the chat template writes after an assistant message, or None."""
    if not tokenizer.chat_template:
        return None
    if tokenizer in _end_of_turn:
        return _end_of_turn[tokenizer]
    marker = "\u2063nextok-end-of-turn\u2063"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": marker}],
                                             add_generation_prompt=False)
    except Exception:  # a template may refuse this conversation; then rely on the EOS ids
        text = ""
    after = text.split(marker, 1)[1] if marker in text else ""
    ids = tokenizer.encode(after.lstrip(" "), add_special_tokens=False) if after.strip() else []
    specials = {t.content for t in tokenizer.backend.get_added_tokens_decoder().values() if t.special}
    found = ids[0] if ids and tokenizer.token_to_str(ids[0]) in specials else None
    _end_of_turn[tokenizer] = found
    return found

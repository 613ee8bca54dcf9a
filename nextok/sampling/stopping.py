"""When a sequence stops, as one pure function with distinct reasons."""

from __future__ import annotations

from nextok.params import SamplingParams


def check_stop(
    params: SamplingParams,
    last_token: int,
    num_output_tokens: int,
    num_tokens: int,
    eos_token_ids: frozenset[int],
    max_model_len: int,
) -> str | None:
    """The finish reason after `last_token` was appended, or None to go on.

    "stop": an end token (the model's EOS unless ignore_eos, or a stop_token_id);
    "length": max_new_tokens generated, or the model's context is full.
    min_new_tokens is enforced earlier, by suppressing end tokens in the logits.
    """
    if last_token in eos_token_ids and num_output_tokens > params.min_new_tokens - 1:
        return "stop"
    if num_output_tokens >= params.max_new_tokens or num_tokens >= max_model_len:
        return "length"
    return None


def find_stop_string(text: str, num_new_chars: int, stops: list[str]) -> int | None:
    """Where to cut `text` if a stop string ends within its last num_new_chars characters.

    Only the tail that can hold a stop string touching the new text is searched, so the cost per
    step does not grow with the output. Returns the index of the earliest stop string's start.
    """
    if not stops or num_new_chars <= 0:
        return None
    longest = max(len(s) for s in stops)
    start = max(0, len(text) - num_new_chars - longest + 1)
    window = text[start:]
    found = [i for s in stops if (i := window.find(s)) != -1]
    return start + min(found) if found else None

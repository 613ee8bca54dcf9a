"""The model's context limit, the one rule every strategy and every way in follows.

A request's prompt must leave room for at least one new token; generation then stops at the context
with finish_reason "length", for greedy, sampled and beam requests alike: its max_new_tokens (and
min_new_tokens) are cut to the room the prompt leaves, before anything is scheduled.
"""

from __future__ import annotations

from nextok.params import SamplingParams


def context_room(num_prompt_tokens: int, max_model_len: int) -> int:
    """How many tokens a prompt of this length leaves room for; ValueError where it leaves none."""
    if num_prompt_tokens >= max_model_len:
        raise ValueError(f"the prompt has {num_prompt_tokens} tokens but the model's context holds {max_model_len}; "
                         f"shorten the prompt to at most {max_model_len - 1} tokens")
    return max_model_len - num_prompt_tokens


def fit_to_context(params: SamplingParams, num_prompt_tokens: int, max_model_len: int) -> SamplingParams:
    """params with max_new_tokens (and min_new_tokens) cut to what the context leaves room for."""
    room = context_room(num_prompt_tokens, max_model_len)
    if params.max_new_tokens <= room:
        return params
    return params.replace(max_new_tokens=room, min_new_tokens=min(params.min_new_tokens, room))

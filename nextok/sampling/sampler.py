"""Sampling primitives: pure functions with no device sync, reproducible per request.

Randomness comes from a counter-based hash (splitmix64 on int64 tensors), not from a stateful
generator: row b's draws depend only on (seeds[b], counters[b]) and the column index, so a request
samples the same tokens whatever else is in the batch, on any device. The engine gives each
sequence its own seed (`mix_seed(request_seed, sequence_index)`) and uses the step index as counter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """A 64-bit constant as the int64 that holds the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic, so mask the sign-extended bits)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (multiplication wraps modulo 2**64)."""
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def _mix_int(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def mix_seed(seed: int, stream: int) -> int:
    """A seed for stream `stream` (e.g. the n-th sequence) of a request seeded with `seed`,
    as a non-negative int64."""
    z = _mix_int((seed * 0x9E3779B97F4A7C15 + stream + 1) & _MASK64)
    return _mix_int((z + 0x9E3779B97F4A7C15) & _MASK64) >> 1


def random_uniform(
    seeds: torch.Tensor, counters: torch.Tensor, n: int, dtype: torch.dtype = torch.float64,
    columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B,) int64 seeds and counters -> (B, n) uniforms in the open interval (0, 1).

    Column j of row b is a hash of (seeds[b], counters[b], j) only. float64 uses 53 random bits,
    float32 23 (so that (k + 0.5) / 2**23 is exact and strictly inside (0, 1)). With `columns`
    (B, K) given, only those columns are drawn: the values equal the full draw's at those columns.
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"random_uniform dtype={dtype} is not supported: use torch.float32 or torch.float64.")
    seeds, counters = seeds.to(torch.long), counters.to(torch.long)
    state = _mix(_mix(seeds + _GOLDEN) ^ counters)  # (B,): one splitmix64 stream per row
    if columns is None:
        index = torch.arange(1, n + 1, dtype=torch.long, device=seeds.device)[None, :]  # (1, n)
    else:
        index = columns.to(torch.long) + 1  # (B, K)
    bits = _mix(state.unsqueeze(1) + index * _GOLDEN)  # (B, n) or (B, K)
    precision = 53 if dtype == torch.float64 else 23
    top = _shr(bits, 64 - precision)  # in [0, 2**precision)
    return (top.to(dtype) + 0.5) * (2.0 ** -precision)  # exact, in (0, 1)


def _gumbel(shape_like: torch.Tensor, seeds: torch.Tensor, counters: torch.Tensor,
            columns: torch.Tensor | None = None) -> torch.Tensor:
    """-log(Exp(1)) noise shaped like (B, N) logits, computed in float64, cast to the logits' dtype."""
    uniform = random_uniform(seeds, counters, shape_like.shape[-1], columns=columns)  # (B, N) float64
    exponential = -torch.log(uniform)  # (B, N), Exp(1), strictly positive
    return (-torch.log(exponential)).to(shape_like.dtype)  # (B, N)


def sample(logits: torch.Tensor, seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """(B, V) processed logits (may hold -inf) -> (B,) int64 token ids drawn from softmax(logits).

    The exponential race argmax(probs / Exp(1)) == argmax(logits - log Exp(1)) (Gumbel-max):
    no multinomial. A -inf logit never wins unless the whole row is -inf. When the warpers left
    few finite logits (top-k, top-p), noise is drawn for those tokens only: the same noise the full
    draw would give them, so the result is identical, at a fraction of the cost.
    """
    width = int((logits > float("-inf")).sum(-1).max())  # warped logits are finite or -inf
    if 0 < width <= logits.shape[-1] // 8:
        candidate_logits, candidates = torch.topk(logits, width, dim=-1)  # (B, width): every finite logit
        return sample_among(candidate_logits, candidates, seeds, counters)
    return torch.argmax(logits + _gumbel(logits, seeds, counters), dim=-1)  # (B,)


def sample_among(logits: torch.Tensor, columns: torch.Tensor, seeds: torch.Tensor,
                 counters: torch.Tensor) -> torch.Tensor:
    """(B, K) logits of the vocabulary ids `columns` (B, K) -> (B,) token ids.

    The draw `sample` makes on full rows whose other logits are -inf: each candidate gets the
    noise the full draw gives its column.
    """
    noisy = logits + _gumbel(logits, seeds, counters, columns=columns)
    return columns.gather(1, torch.argmax(noisy, dim=-1, keepdim=True))[:, 0]  # (B,)


def sample_without_replacement(
    logits: torch.Tensor, k: int, seeds: torch.Tensor, counters: torch.Tensor
) -> torch.Tensor:
    """(B, N) logits -> (B, k) distinct indices (Gumbel-top-k), in draw order.

    Same distribution as ``torch.multinomial(softmax(logits), k, replacement=False)``; beam
    sampling uses it. Rows need at least k finite logits, as multinomial needs k non-zero probs.
    """
    return torch.topk(logits + _gumbel(logits, seeds, counters), k, dim=-1).indices  # (B, k)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) -> (B,) argmax; ties go to the lowest id, as in transformers' greedy search."""
    return torch.argmax(logits, dim=-1)


@dataclass
class TopLogprobs:
    """Per-row log-probabilities for SamplingParams.logprobs, as tensors (converted once per step)."""

    chosen: torch.Tensor  # (B,) logprob of the chosen token
    values: torch.Tensor  # (B, k) top-k logprobs, descending
    ids: torch.Tensor  # (B, k) their token ids


def top_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, k: int) -> TopLogprobs:
    """(B, V) logprobs and (B,) chosen ids -> the chosen logprob and the k most likely tokens."""
    chosen_logprob = logprobs.gather(1, chosen.long().unsqueeze(1)).squeeze(1)  # (B,)
    values, ids = torch.topk(logprobs, min(k, logprobs.shape[-1]), dim=-1)  # (B, k)
    return TopLogprobs(chosen=chosen_logprob, values=values, ids=ids)

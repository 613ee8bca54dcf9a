"""select_tokens' top-k fast path draws exactly what the full-vocabulary warpers and draw give."""

from types import SimpleNamespace

import pytest
import torch

from nextok.params import SamplingParams
from nextok.sampling import selection
from nextok.sampling.selection import select_tokens

VOCAB = 2000


def _seqs(params: list[SamplingParams], step: int):
    request = lambda i: SimpleNamespace(seed=100 + i, eos_token_ids=frozenset({2}))  # noqa: E731
    return [SimpleNamespace(params=p, token_ids=[5, 6, 7], num_prompt_tokens=3, request=request(i),
                            sample_index=i, num_output_tokens=step) for i, p in enumerate(params)]


def _both(params, logits, step, monkeypatch):
    taken = []
    real = selection.sample_top_k_rows
    with monkeypatch.context() as m:
        m.setattr(selection, "sample_top_k_rows", lambda *a: taken.append(real(*a)) or taken[-1])
        fast = select_tokens(_seqs(params, step), logits)
    assert taken and taken[0] is not None  # the fast path ran
    with monkeypatch.context() as m:
        m.setattr(selection, "sample_top_k_rows", lambda *a: None)
        full = select_tokens(_seqs(params, step), logits)
    return fast, full


CASES = [
    [SamplingParams(do_sample=True, top_k=50)] * 4,
    [SamplingParams(do_sample=True, top_k=k, temperature=t) for k, t in [(1, 1.0), (7, 0.6), (40, 1.7), (200, 1.0)]],
    [SamplingParams(do_sample=True, top_k=30, top_p=0.8), SamplingParams(do_sample=True, top_k=90, min_p=0.05),
     SamplingParams(do_sample=True, top_k=60, typical_p=0.7, temperature=0.8)],
    [SamplingParams(do_sample=True, top_k=20), SamplingParams(), SamplingParams(do_sample=True, top_k=5)],
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_top_k_fast_path_equals_the_full_rows(case, monkeypatch):
    torch.manual_seed(case)
    for step in range(25):
        logits = torch.randn(len(CASES[case]), VOCAB) * 3
        fast, full = _both(CASES[case], logits, step, monkeypatch)
        assert fast.tokens == full.tokens and fast.logprobs == full.logprobs


def test_ties_at_the_k_th_place_within_the_margin_stay_on_the_fast_path(monkeypatch):
    logits = torch.randn(2, VOCAB)
    logits[:, :12] = 9.0  # 12 tokens tied for first place, top_k 5: transformers keeps all 12
    params = [SamplingParams(do_sample=True, top_k=5)] * 2
    drawn = set()
    for step in range(60):
        fast, full = _both(params, logits, step, monkeypatch)
        assert fast.tokens == full.tokens
        drawn.update(fast.tokens)
    assert drawn - set(range(5))  # tokens past the 5th of the tie are drawn too
    assert drawn <= set(range(12))


def test_bfloat16_logits_full_of_ties_stay_exact(monkeypatch):
    torch.manual_seed(7)
    params = [SamplingParams(do_sample=True, top_k=50)] * 4
    for step in range(25):
        logits = (torch.randn(4, VOCAB) * 3).bfloat16().float()  # 8-bit mantissas: ties near the 50th are common
        fast, full = _both(params, logits, step, monkeypatch)
        assert fast.tokens == full.tokens and fast.logprobs == full.logprobs


def test_ties_past_the_margin_take_the_full_rows(monkeypatch):
    logits = torch.randn(2, VOCAB)
    logits[:, :5 + selection.TIE_MARGIN + 10] = 9.0  # more tied tokens than the fast path fetches
    params = [SamplingParams(do_sample=True, top_k=5)] * 2
    calls = []
    real = selection.sample_top_k_rows
    monkeypatch.setattr(selection, "sample_top_k_rows", lambda *a: calls.append(real(*a)) or calls[-1])
    drawn = set()
    for step in range(80):
        drawn.update(select_tokens(_seqs(params, step), logits).tokens)
    assert calls and all(c is None for c in calls)
    assert drawn - set(range(5 + selection.TIE_MARGIN))  # tokens past the margin are drawn too
    assert drawn <= set(range(5 + selection.TIE_MARGIN + 10))

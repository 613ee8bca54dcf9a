"""Ranking of beam candidates: the same answer as torch.topk, which transformers uses."""

import pytest
import torch

from nextok.kernels import library
from nextok.sampling.beam import top_k_as_torch


@pytest.mark.parametrize("seed", range(5))
def test_distinct_candidates_rank_as_torch_topk(seed):
    torch.manual_seed(seed)
    x = torch.log_softmax(torch.randn(5, 49152) * 3, dim=-1).reshape(-1)  # 5 beams' log-probabilities
    values, indices = top_k_as_torch(x, 10)
    expected = torch.topk(x, 10)
    assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)


@pytest.mark.parametrize("tied", [(3, 4), (9, 10), (0, 1, 2)])  # within the k best, at the k-th, the best
def test_tied_candidates_keep_torch_topk_order(tied):
    torch.manual_seed(0)
    x = torch.randn(4000)
    order = torch.argsort(x, descending=True)
    for i in tied[1:]:
        x[order[i]] = x[order[tied[0]]]
    values, indices = top_k_as_torch(x, 10)
    expected = torch.topk(x, 10)
    assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)


def test_fewer_candidates_than_k_plus_one():
    x = torch.tensor([0.5, -1.0, 2.0])
    values, indices = top_k_as_torch(x, 3)
    assert values.tolist() == [2.0, 0.5, -1.0] and indices.tolist() == [2, 0, 1]


@pytest.mark.skipif(library() is None, reason="the one-pass ranking is a CPU kernel")
def test_distinct_candidates_take_the_kernel(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(5 * 49152)
    expected = torch.topk(x, 10)

    def unexpected(*args, **kwargs):
        raise AssertionError("torch.topk ranked candidates without ties")

    monkeypatch.setattr(torch, "topk", unexpected)
    values, indices = top_k_as_torch(x, 10)
    assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)

"""Sampling primitives: distribution (chi-square), reproducibility, independence from the batch."""

from __future__ import annotations

import itertools

import pytest
import torch

from nextok.sampling.sampler import (
    TopLogprobs, greedy, mix_seed, random_uniform, sample, sample_without_replacement, top_logprobs,
)

# Upper 0.1% points of the chi-square distribution, by degrees of freedom. The draws are a fixed
# function of the seeds, so each test is deterministic; a correct sampler passes at this level.
CHI2_CRITICAL_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322,
                     8: 26.124, 9: 27.877, 10: 29.588, 11: 31.264, 12: 32.909}
MASK64 = (1 << 64) - 1


def chi_square(observed: torch.Tensor, expected_probs: torch.Tensor) -> tuple[float, int]:
    """Statistic and degrees of freedom over the categories with non-zero probability."""
    support = expected_probs > 0
    assert observed[~support].sum() == 0, "a zero-probability category was drawn"
    n = observed.sum()
    expected = expected_probs[support].double() * n
    assert expected.min() >= 5, "test design: every expected count must be >= 5"
    stat = ((observed[support].double() - expected) ** 2 / expected).sum().item()
    return stat, int(support.sum()) - 1


def draws(logits: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n draws from one (V,) row: the same seed at counters 0..n-1, all in one batch."""
    seeds = torch.full((n,), seed, dtype=torch.long)
    return sample(logits.expand(n, -1), seeds, torch.arange(n))  # (n,)


LOGITS = {
    "moderate": torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, 1.5, -1.0, 0.2]),
    "flat": torch.zeros(10),
    "with_inf": torch.tensor([0.3, float("-inf"), 1.2, -0.4, float("-inf"), 0.0, 0.9]),
    "peaked": torch.tensor([6.0, 0.0, 0.5, -0.5, 1.0]),
}


@pytest.mark.parametrize("name", LOGITS)
@pytest.mark.parametrize("seed", (0, 12345))
def test_sample_matches_softmax_chi_square(name, seed):
    logits = LOGITS[name]
    tokens = draws(logits, 40_000, seed)
    observed = torch.bincount(tokens, minlength=len(logits))
    stat, df = chi_square(observed, logits.softmax(-1))
    assert stat < CHI2_CRITICAL_999[df], (stat, df)


def test_sample_rows_with_different_logits_each_follow_their_softmax():
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(4, 6, generator=gen)  # (4, 6)
    n = 20_000
    logits = rows.repeat_interleave(n, dim=0)  # (4n, 6)
    seeds = torch.arange(4).repeat_interleave(n) * 1000 + 7
    tokens = sample(logits, seeds, torch.arange(n).repeat(4)).view(4, n)
    for r in range(4):
        stat, df = chi_square(torch.bincount(tokens[r], minlength=6), rows[r].softmax(-1))
        assert stat < CHI2_CRITICAL_999[df], (r, stat)


def test_same_seed_and_counter_same_token_and_counters_differ():
    logits = torch.zeros(3, 1000)
    seeds, counters = torch.tensor([5, 5, 6]), torch.tensor([3, 3, 3])
    first = sample(logits, seeds, counters)
    assert torch.equal(first, sample(logits, seeds, counters))
    assert first[0] == first[1]
    assert first[0] != first[2]  # another seed: a different draw (1 in 1000 to collide)
    other = sample(logits[:1].expand(50, -1), torch.full((50,), 5), torch.arange(50))
    assert len(set(other.tolist())) > 40  # counters give fresh draws


@pytest.mark.parametrize("batch_size", (1, 3, 8))
def test_row_draws_do_not_depend_on_the_rest_of_the_batch(batch_size):
    gen = torch.Generator().manual_seed(batch_size)
    target = torch.randn(1, 300, generator=gen)
    alone = [sample(target, torch.tensor([42]), torch.tensor([c])).item() for c in range(20)]
    for position in {0, batch_size - 1}:
        others = torch.randn(batch_size, 300, generator=gen)
        others[position] = target[0]
        seeds = torch.randint(0, 2**40, (batch_size,), generator=gen)
        seeds[position] = 42
        for c in range(20):
            counters = torch.randint(0, 100, (batch_size,), generator=gen)
            counters[position] = c
            assert sample(others, seeds, counters)[position].item() == alone[c]


def test_neg_inf_is_never_chosen():
    logits = torch.full((4, 500), float("-inf"))
    logits[0, 17] = 3.0  # a single finite entry always wins
    logits[1, [3, 400]] = torch.tensor([-50.0, -60.0])  # far below zero, still finite
    logits[2, ::7] = 0.0
    logits[3, 499] = 1e4
    n = 2000
    tokens = sample(logits.repeat(n, 1), torch.arange(4 * n), torch.zeros(4 * n, dtype=torch.long)).view(n, 4)
    assert (tokens[:, 0] == 17).all() and (tokens[:, 3] == 499).all()
    assert set(tokens[:, 1].tolist()) <= {3, 400}
    assert (tokens[:, 2] % 7 == 0).all()
    picks = sample_without_replacement(logits[2:3].expand(n, -1), 5, torch.arange(n), torch.zeros(n))
    assert (picks % 7 == 0).all()


def test_sample_without_replacement_distinct_and_first_pick_marginal():
    logits = torch.tensor([1.0, 0.0, 2.0, -1.0, 0.5, 1.5])
    n = 40_000
    picks = sample_without_replacement(logits.expand(n, -1), 4, torch.full((n,), 9), torch.arange(n))  # (n, 4)
    assert picks.shape == (n, 4)
    assert (picks.sort(dim=1).values.diff(dim=1) > 0).all()  # distinct in every row
    stat, df = chi_square(torch.bincount(picks[:, 0], minlength=6), logits.softmax(-1))
    assert stat < CHI2_CRITICAL_999[df], stat


def test_sample_without_replacement_ordered_pairs_match_sequential_draws():
    """P(first = i, second = j) = p_i * p_j / (1 - p_i), as multinomial without replacement."""
    logits = torch.tensor([0.8, 0.0, -0.5, 0.4])
    p = logits.double().softmax(-1)
    n = 40_000
    picks = sample_without_replacement(logits.expand(n, -1), 2, torch.full((n,), 3), torch.arange(n))
    pairs = list(itertools.permutations(range(4), 2))
    observed = torch.tensor([((picks[:, 0] == i) & (picks[:, 1] == j)).sum().item() for i, j in pairs])
    expected = torch.tensor([(p[i] * p[j] / (1 - p[i])).item() for i, j in pairs])
    stat, df = chi_square(observed, expected)
    assert stat < CHI2_CRITICAL_999[df], stat


def test_sample_without_replacement_first_pick_equals_sample():
    logits = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    seeds, counters = torch.arange(5) * 3, torch.arange(5) + 11
    assert torch.equal(sample_without_replacement(logits, 3, seeds, counters)[:, 0], sample(logits, seeds, counters))


def test_greedy_ties_go_to_lowest_id():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [float("-inf"), 5.0, 1.0, 5.0]])
    assert greedy(logits).tolist() == [1, 1]


def test_random_uniform_matches_reference_splitmix64_and_is_column_stable():
    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    golden = 0x9E3779B97F4A7C15
    seeds, counters = torch.tensor([0, 1, 2**62, 98765432123]), torch.tensor([0, 7, 3, 2**40])
    u = random_uniform(seeds, counters, 6)  # (4, 6)
    for b, (seed, counter) in enumerate(zip(seeds.tolist(), counters.tolist())):
        state = mix(mix((seed + golden) & MASK64) ^ counter)
        for j in range(6):
            bits = mix((state + (j + 1) * golden) & MASK64)
            assert u[b, j].item() == ((bits >> 11) + 0.5) / 2**53
    assert torch.equal(random_uniform(seeds, counters, 3), u[:, :3])  # a column depends only on its index


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_random_uniform_is_strictly_inside_unit_interval(dtype):
    u = random_uniform(torch.arange(64), torch.arange(64) * 5, 4096, dtype=dtype)  # (64, 4096)
    assert u.dtype == dtype and (u > 0).all() and (u < 1).all()
    assert abs(u.double().mean().item() - 0.5) < 0.005
    assert abs(u.double().var().item() - 1 / 12) < 0.002


def test_mix_seed_gives_distinct_non_negative_streams():
    seeds = {mix_seed(s, i) for s in range(20) for i in range(20)}
    assert len(seeds) == 400 and min(seeds) >= 0 and max(seeds) < 2**63


def test_top_logprobs():
    logprobs = torch.randn(3, 20, generator=torch.Generator().manual_seed(2)).log_softmax(-1)
    chosen = torch.tensor([4, 0, 19])
    out = top_logprobs(logprobs, chosen, 5)
    assert isinstance(out, TopLogprobs)
    assert torch.equal(out.chosen, logprobs[torch.arange(3), chosen])
    assert out.values.shape == out.ids.shape == (3, 5)
    assert torch.equal(out.values, logprobs.gather(1, out.ids))
    assert torch.equal(out.values, logprobs.sort(dim=-1, descending=True).values[:, :5])
    assert top_logprobs(logprobs, chosen, 0).ids.shape == (3, 0)


@pytest.mark.parametrize("keep", [1, 5, 50, 300])
def test_sampling_among_few_finite_logits_equals_the_full_draw(keep):
    """The short cut over the surviving tokens draws exactly what the full-vocabulary race draws."""
    from nextok.sampling.sampler import _gumbel

    g = torch.Generator().manual_seed(keep)
    logits = torch.randn(6, 4096, generator=g)
    cut = torch.topk(logits, keep, dim=-1).values[:, -1:]
    logits = logits.masked_fill(logits < cut, float("-inf"))
    for step in range(20):
        seeds = torch.arange(6, dtype=torch.long) * 7919 + 11
        counters = torch.full((6,), step, dtype=torch.long)
        full = torch.argmax(logits + _gumbel(logits, seeds, counters), dim=-1)
        assert torch.equal(sample(logits, seeds, counters), full)

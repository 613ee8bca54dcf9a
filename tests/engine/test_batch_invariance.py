"""A request's tokens never depend on what else is in its batch or step, in every dtype: 30 prompts of
the default model, greedy, each alone and in batches of 4, 16 and 30 give identical tokens and identical
log-probabilities (the kernels compute each row alone; attention computes each query alone)."""

from __future__ import annotations

import random

import pytest

from nextok import SamplingParams

WORDS = ("the quick brown fox jumps over a lazy dog while people walk along the river and talk about music "
         "books weather science history").split()


def _prompts() -> list[str]:
    rng = random.Random(0)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))) for _ in range(30)]
    prompts[:2] = ["My favourite food is", "I enjoy walking with my cute dog"]  # the example first
    return prompts


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_thirty_prompts_alone_and_in_batches_of_4_16_30(dtype):
    from nextok import LLM
    from nextok.kernels import has

    if dtype != "float32" and not has("linear_bf16"):
        pytest.skip("bfloat16 and int8 need nextok's bfloat16 kernels; without them PyTorch runs the products")
    # a small step budget, so that batches also split prompts into chunks at other places than alone
    llm = LLM(dtype=dtype, kv_cache_memory=256 << 20, max_num_batched_tokens=96)
    prompts = _prompts()
    params = SamplingParams(max_new_tokens=16, logprobs=0)

    def run(batch: list[str]) -> list[tuple]:
        return [(c.token_ids, c.score, c.logprobs) for r in llm.generate(batch, params, use_tqdm=False)
                for c in r.outputs]

    alone = [run([p])[0] for p in prompts]
    for size in (4, 16, 30):
        together = [row for i in range(0, 30, size) for row in run(prompts[i:i + size])]
        assert together == alone, (dtype, size, [i for i, (a, b) in enumerate(zip(alone, together)) if a != b])

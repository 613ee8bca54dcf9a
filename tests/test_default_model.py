"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF): nextok equals transformers' load of the same file."""

from __future__ import annotations

import pytest
import torch

from nextok import SamplingParams

PROMPT = "I enjoy walking with my cute dog"


@pytest.fixture(scope="module")
def prompt_ids(default_llm):
    return default_llm.tokenizer.encode(PROMPT)


def test_logits_at_every_position_match(default_llm, hf_default_model, prompt_ids):
    ids = torch.tensor(prompt_ids)
    with torch.inference_mode():
        expected = hf_default_model(ids[None]).logits[0]
        got = default_llm.model.compute_logits(default_llm.model(ids, torch.arange(len(ids))))
    assert (got - expected).abs().max().item() < 1e-4


def _hf(hf_default_model, ids, **kwargs):
    out = hf_default_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    return_dict_in_generate=True, output_scores=True, **kwargs)
    return [s[len(ids):].tolist() for s in out.sequences], getattr(out, "sequences_scores", None)


def test_greedy_tokens_match(default_llm, hf_default_model, prompt_ids):
    expected, _ = _hf(hf_default_model, prompt_ids, max_new_tokens=30, do_sample=False)
    got = default_llm.generate(PROMPT, SamplingParams(max_new_tokens=30))[0].outputs[0].token_ids
    assert got == expected[0][: len(got)] and len(got) == len(expected[0])


def test_beam_search_with_penalties_matches(default_llm, hf_default_model, prompt_ids):
    kwargs = dict(max_new_tokens=20, num_beams=4, no_repeat_ngram_size=2, repetition_penalty=1.5,
                  early_stopping=True, num_return_sequences=3)
    expected, scores = _hf(hf_default_model, prompt_ids, do_sample=False, **kwargs)
    result = default_llm.generate(PROMPT, SamplingParams(**kwargs))[0]
    assert [c.token_ids for c in result.outputs] == expected
    assert [c.score for c in result.outputs] == pytest.approx(scores.tolist(), abs=1e-4)


def test_default_text_is_english(default_llm):
    text = default_llm.generate(PROMPT, SamplingParams(max_new_tokens=20))[0].outputs[0].text
    assert sum(ch.isalpha() for ch in text) > 20


def test_float32_weights_stay_in_the_checkpoints_blocks(default_llm):
    """The GGUF's Q4_1 layers and Q8_0 head run from their blocks (bit-exact float32, see ops.pack_blocks),
    so the parity tests above cover that path."""
    from nextok.kernels import library

    if library() is None:
        pytest.skip("nextok's CPU kernels need AVX-512 BF16 and a C compiler")
    sizes = [m.packed.shape[-1] for m in default_llm.model.modules() if getattr(m, "packed", None) is not None]
    assert sizes.count(384) == 4 * default_llm.model.config.num_hidden_layers  # qkv, o, gate_up, down: Q4_1
    assert sizes.count(576) == 1  # the tied head: Q8_0


def test_bfloat16_weights_stay_in_the_blocks_and_int8_requantizes():
    """bfloat16 reads the same blocks (bit-identical to the cast matrices, see tests/kernels/test_fused.py);
    int8 requantizes, so it builds no blocks first."""
    from nextok import LLM
    from nextok.kernels import has

    if not has("linear_bf16"):
        pytest.skip("bfloat16 blocks need nextok's bfloat16 kernels (AVX-512 BF16)")
    model = LLM(dtype="bfloat16").model
    sizes = [m.packed.shape[-1] for m in model.modules() if getattr(m, "packed", None) is not None]
    assert sizes.count(384) == 4 * model.config.num_hidden_layers and sizes.count(576) == 1
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    int8 = LLM(dtype="int8").model
    assert all(m.packed.dtype == torch.int8 for m in int8.modules() if getattr(m, "packed", None) is not None)

"""Run transformers' generate and nextok's engine on the same weights and token ids."""

from __future__ import annotations

import torch

from nextok.engine.engine import LLMEngine
from nextok.params import SamplingParams

HF_ARGS = ("max_new_tokens", "min_new_tokens", "num_beams", "early_stopping", "length_penalty",
           "num_return_sequences", "no_repeat_ngram_size", "repetition_penalty", "bad_words_ids", "do_sample",
           "top_k", "top_p", "temperature")


def hf_generate(ref, prompt: list[int], eos: int, **kwargs) -> tuple[list[list[int]], list[float] | None]:
    """transformers' result for one prompt: generated tokens (cut after EOS) and beam scores."""
    hf_kwargs = {k: v for k, v in kwargs.items() if k in HF_ARGS}
    out = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                       pad_token_id=0, eos_token_id=eos, return_dict_in_generate=True, output_scores=True,
                       **hf_kwargs)
    seqs = [cut_after_eos(s[len(prompt):].tolist(), eos) for s in out.sequences]
    scores = out.sequences_scores.tolist() if getattr(out, "sequences_scores", None) is not None else None
    return seqs, scores


def cut_after_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def engine_for(model, eos: int, **kwargs) -> LLMEngine:
    return LLMEngine(model, [eos], kv_cache_memory=kwargs.pop("kv_cache_memory", 16 << 20),
                     block_size=kwargs.pop("block_size", 4), **kwargs)


def run_engine(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]):
    """Submit every prompt at once (one continuously batched run); outputs in input order."""
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    requests = [engine.add_request(p, sp) for p, sp in zip(prompts, params_list)]
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.num_used == 0, "finished requests must give every KV block back"
    return [engine.output(r) for r in requests]


def random_prompts(n: int, vocab: int, seed: int, low: int = 3, high: int = 20) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for length in lengths]

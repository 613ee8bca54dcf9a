"""The classic tour of decoding strategies, on nextok's default model.

Run:  .venv/bin/python examples/decoding_tour.py   (add --dtype bfloat16 for speed)

Each section prints its result under a heading: a hand-written greedy loop over the model's
logits, then greedy search, beam search, beam search with n-gram and repetition penalties,
several returned beams, top-k sampling, top-p sampling, two temperatures, and a batch of prompts.
"""

from __future__ import annotations

import argparse

import torch

from nextok import LLM, SamplingParams

PROMPT = "I enjoy walking with my cute dog"


def heading(title: str) -> None:
    print(f"\n{'=' * 8} {title} {'=' * (60 - len(title))}")


def handwritten_greedy(llm: LLM, prompt: str, steps: int) -> str:
    """Greedy decoding by hand: run the model, take the most likely next token, append, repeat."""
    ids = llm.encode(prompt)
    model = llm.model
    with torch.inference_mode():
        for _ in range(steps):
            tokens = torch.tensor(ids, device=llm.device)
            hidden = model(tokens, torch.arange(len(ids), device=llm.device))  # (T, hidden), no cache: recompute all
            next_token = int(model.compute_logits(hidden[-1:]).argmax(dim=-1))  # the last position predicts the next
            ids.append(next_token)
            if next_token in llm.eos_token_ids:
                break
    return llm.tokenizer.decode(ids)


def show(llm: LLM, title: str, params: SamplingParams, prompts: str | list[str] = PROMPT) -> None:
    heading(title)
    for result in llm.generate(prompts, params, use_tqdm=False):
        for c in result.outputs:
            prefix = f"{c.index}: " if len(result.outputs) > 1 else ""
            print(f"{prefix}{result.prompt}{c.text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder or .gguf (default: the embedded SmolLM2)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args()
    llm = LLM(args.model, dtype=args.dtype)
    n = args.max_new_tokens

    heading("A greedy loop by hand over compute_logits")
    print(handwritten_greedy(llm, PROMPT, steps=n))
    show(llm, "Greedy search", SamplingParams(max_new_tokens=n))
    show(llm, "Beam search (5 beams, early stopping)", SamplingParams(max_new_tokens=n, num_beams=5, early_stopping=True))
    show(llm, "Beam search + no_repeat_ngram_size=2 + repetition_penalty=1.5",
         SamplingParams(max_new_tokens=n, num_beams=5, early_stopping=True, no_repeat_ngram_size=2,
                        repetition_penalty=1.5))
    show(llm, "Five return sequences from beam search",
         SamplingParams(max_new_tokens=n, num_beams=5, early_stopping=True, no_repeat_ngram_size=2,
                        num_return_sequences=5))
    show(llm, "Top-k sampling (k=50)", SamplingParams(max_new_tokens=n, do_sample=True, top_k=50, seed=0))
    show(llm, "Top-p (nucleus) sampling (p=0.92, top-k off)",
         SamplingParams(max_new_tokens=n, do_sample=True, top_k=0, top_p=0.92, seed=0))
    for temperature in (0.7, 1.5):
        show(llm, f"Sampling at temperature {temperature}",
             SamplingParams(max_new_tokens=n, do_sample=True, top_k=0, temperature=temperature, seed=0))
    show(llm, "A batch of prompts (continuously batched, each as if alone)", SamplingParams(max_new_tokens=20),
         prompts=["The weather today is", "My favourite food is", "Once upon a time, in a small village,",
                  "The best way to learn to code is"])


if __name__ == "__main__":
    main()

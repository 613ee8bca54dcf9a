"""Batch generation over a JSONL file: `nextok batch` next to transformers' pipeline(batch_size=16).

    python benchmarks/batch.py                                   # 1,000 prompts, 64 new tokens
    python benchmarks/batch.py --num-prompts 64 --max-new-tokens 32

Both sides read the same generated JSONL file of prompts of mixed lengths (a few words to a few
hundred), decode greedily on the default model in float32 (the GGUF dequantized; transformers loads
it with `from_pretrained(dir, gguf_file=...)`). Every completion is exactly max_new_tokens long
(min_new_tokens = max_new_tokens on both sides, so tokens/s compares like with like); --stop-at-eos
lets both stop at EOS instead.
nextok runs the whole file through `run_batch` (continuous batching, results appended to a JSONL file
as they finish); transformers runs `pipeline("text-generation", batch_size=16)` over the prompts, the
tutorial's way. Model loading is not timed. Tokens are the generated tokens (with --stop-at-eos, the
pipeline's are counted by encoding its generated text again). All numbers come from this one run on this machine.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from nextok import LLM, SamplingParams
from nextok.batch import run_batch
from nextok.paths import default_model_path

TOPICS = ["the history of the printing press", "how bees find flowers", "a quiet morning in a mountain village",
          "why the sky is blue", "the rules of chess", "a recipe for bread", "learning a new language",
          "the life of a lighthouse keeper", "how computers store numbers", "a storm at sea"]
FILLER = ("It was late and the streets were empty, but the lamps still burned along the river while the "
          "old clock on the tower counted the hours for nobody in particular. ").split()


def write_prompts(path: Path, n: int, seed: int = 0) -> None:
    """n prompts of mixed lengths: a short instruction after 0 to ~300 words of context."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            context = " ".join(FILLER[(i + j) % len(FILLER)] for j in range(rng.choice([0, 5, 20, 60, 150, 300])))
            prompt = f"{context}\nWrite a few sentences about {TOPICS[i % len(TOPICS)]}.".strip()
            f.write(json.dumps({"id": f"p{i}", "prompt": prompt}) + "\n")


def run_nextok(llm: LLM, src: Path, out: Path, max_new_tokens: int, min_new_tokens: int) -> tuple[float, int]:
    params = SamplingParams(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens)
    llm.generate("warm up", params, use_tqdm=False)
    start = time.perf_counter()
    summary = run_batch(llm, src, out, params, progress=False)
    seconds = time.perf_counter() - start
    assert summary.completed == sum(1 for _ in open(src)) and not summary.errors, summary
    return seconds, summary.generated_tokens


def run_pipeline(src: Path, max_new_tokens: int, min_new_tokens: int, batch_size: int) -> tuple[float, int, list[str]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    prompts = [json.loads(line)["prompt"] for line in open(src)]
    kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False, return_full_text=False,
                  pad_token_id=tokenizer.pad_token_id)
    pipe(prompts[:1], batch_size=1, **kwargs)  # warm up
    start = time.perf_counter()
    results = pipe(prompts, batch_size=batch_size, **kwargs)
    seconds = time.perf_counter() - start
    texts = [r[0]["generated_text"] for r in results]
    if min_new_tokens == max_new_tokens:
        tokens = max_new_tokens * len(texts)
    else:
        tokens = sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in texts)
    return seconds, tokens, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="the pipeline's batch size")
    parser.add_argument("--stop-at-eos", action="store_true", help="let completions end at EOS (default: fixed length)")
    parser.add_argument("--skip-transformers", action="store_true", help="time nextok only")
    args = parser.parse_args()
    min_new = 0 if args.stop_at_eos else args.max_new_tokens

    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "prompts.jsonl", Path(tmp) / "results.jsonl"
        write_prompts(src, args.num_prompts)
        llm = LLM(dtype="float32")
        lengths = [len(llm.encode(json.loads(line)["prompt"])) for line in open(src)]
        rows = [("nextok batch (continuous batching)",) + run_nextok(llm, src, out, args.max_new_tokens, min_new)]
        ours = {r["id"]: r["outputs"][0]["text"] for r in map(json.loads, open(out))}
        agree = None
        if not args.skip_transformers:
            seconds, tokens, texts = run_pipeline(src, args.max_new_tokens, min_new, args.batch_size)
            rows.insert(0, (f"transformers pipeline(batch_size={args.batch_size})", seconds, tokens))
            agree = sum(ours[f"p{i}"] == t for i, t in enumerate(texts))

    n = args.num_prompts
    print(f"\n{n} prompts of {min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / n:.0f}), greedy, "
          f"{'up to' if args.stop_at_eos else 'exactly'} {args.max_new_tokens} new tokens, float32, CPU threads: {torch.get_num_threads()}")
    reference = rows[0][1]
    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  {'seconds':>8}  {'requests/s':>10}  {'tokens/s':>9}  {'speed-up':>8}")
    for name, seconds, tokens in rows:
        print(f"{name:{width}}  {seconds:8.1f}  {n / seconds:10.2f}  {tokens / seconds:9.1f}  "
              f"{reference / seconds:7.2f}x")
    if agree is not None:
        print(f"identical completions: {agree} of {n} (batched float32 matmuls round differently, so near-ties "
              "can flip)")


if __name__ == "__main__":
    main()

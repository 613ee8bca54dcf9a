"""nextok vs transformers, llama.cpp and CTranslate2 on the default model: one run, one table.

    .venv/bin/python benchmarks/compare.py [--scale 0.25] [--workloads greedy-1,beam-5] [--engines ...]

The workloads are `nextok bench`'s (nextok/cli/bench.py). Every cell runs in its own process; the
ratios are against transformers float32 in the same run. Each peer runs the way its own users batch:
- transformers: `generate` on the whole (left-padded) batch; 64 prompts through `pipeline(batch_size=16)`.
- llama.cpp: its batch API, all sequences in one context decoded together (llama_cpp_batched.py).
- CTranslate2: all prompts in one `generate_batch` call (it groups them by length itself). It takes one
  length for the whole call, so in mixed-64 every prompt generates the longest budget (256 tokens) and
  its tokens/s counts all of them.
Everyone samples with temperature 1 and top-k 50, and EOS is suppressed, so every engine generates
exactly the tokens counted. `make bench-peers` installs llama.cpp (llama-cpp-python) and CTranslate2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from nextok.cli.bench import (NEXTOK_CELLS, TOP_K, Runner, Workload, add_bench_flags, measure, nextok_runner,
                              parse_names, print_report, run_child)
from nextok.paths import default_model_path

ENGINES = ["transformers:float32", "transformers:bfloat16", *NEXTOK_CELLS, "llama.cpp:q4_1", "ctranslate2:float32",
           "ctranslate2:int8"]
_MODULES = {"nextok": "nextok", "transformers": "transformers", "llama.cpp": "llama_cpp", "ctranslate2": "ctranslate2"}


def transformers_runner(dtype: str, w: Workload, model_path: str | None) -> Runner:
    import torch
    import transformers

    path = default_model_path() if model_path is None else Path(model_path)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if path.suffix == ".gguf":
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch_dtype)
        tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        tok = transformers.AutoTokenizer.from_pretrained(path)
    model.eval()
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.padding_side = "left"
    common = dict(eos_token_id=None, pad_token_id=tok.pad_token_id, do_sample=w.do_sample, top_k=TOP_K,
                  temperature=1.0, num_beams=w.num_beams)
    if len(w.prompts) > 16:  # the way people batch many prompts: a pipeline with batch_size 16
        pipe = transformers.pipeline("text-generation", model=model, tokenizer=tok)

        def run(max_new: list[int]) -> None:
            # A pipeline takes one max_new_tokens per call; group prompts by their length budget.
            for new in sorted(set(max_new)):
                group = [p for p, m in zip(w.prompts, max_new) if m == new]
                pipe(group, batch_size=16, max_new_tokens=new, return_full_text=False, **common)
        return run

    def run(max_new: list[int]) -> None:
        batch = tok(w.prompts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            model.generate(**batch, max_new_tokens=max(max_new), **common)
    return run


def llama_cpp_runner(dtype: str, w: Workload, model_path: str | None) -> Runner:
    from llama_cpp_batched import LlamaCppBatched

    if w.num_beams > 1:
        raise RuntimeError("llama.cpp has no beam search")
    path = str(default_model_path() if model_path is None else model_path)
    probe = LlamaCppBatched(path, n_ctx=512, n_seq=1)
    prompts = [probe.tokenize(p) for p in w.prompts]
    probe.close()
    # One KV stream per sequence (llama-server's parallel slots), each long enough for the longest one.
    longest = max(len(p) + m for p, m in zip(prompts, w.max_new_tokens)) + 16
    llm = LlamaCppBatched(path, n_ctx=longest * len(prompts), n_seq=len(prompts), unified=len(prompts) == 1)

    def run(max_new: list[int]) -> None:
        llm.generate(prompts, max_new, sample=w.do_sample, top_k=TOP_K, seeds=list(range(len(prompts))))
    return run


def ctranslate2_runner(dtype: str, w: Workload, model_path: str | None) -> Runner:
    import tempfile

    import ctranslate2

    from nextok.models.loader import gguf_cache_folder, load_checkpoint
    from nextok.paths import default_cache_dir
    from nextok.tokenizer import Tokenizer

    path = default_model_path() if model_path is None else Path(model_path)
    hf_dir = path
    if path.suffix == ".gguf":
        load_checkpoint(path)  # makes sure the converted float32 copy exists
        hf_dir = gguf_cache_folder(path, default_cache_dir())
    out = Path(tempfile.gettempdir()) / f"nextok-ct2-{hf_dir.name}-{dtype}"
    if not out.exists():
        ctranslate2.converters.TransformersConverter(str(hf_dir)).convert(str(out), quantization=dtype, force=True)
    gen = ctranslate2.Generator(str(out), device="cpu", compute_type=dtype, intra_threads=os.cpu_count())
    tok = Tokenizer.from_pretrained(hf_dir)
    tokens = [tok.backend.encode(p).tokens for p in w.prompts]

    def run(max_new: list[int]) -> None:
        longest = max(max_new)  # one length for the whole call: every prompt generates it
        gen.generate_batch(tokens, max_length=longest, min_length=longest, include_prompt_in_result=False,
                           beam_size=w.num_beams, sampling_topk=TOP_K if w.do_sample else 1, sampling_temperature=1.0)
    return run


RUNNERS = {"nextok": nextok_runner, "transformers": transformers_runner, "llama.cpp": llama_cpp_runner,
           "ctranslate2": ctranslate2_runner}


def counted_tokens(engine: str, w: Workload) -> int | None:
    """CTranslate2 generates the longest budget for every prompt (see the module docstring)."""
    return len(w.prompts) * max(w.max_new_tokens) if engine.startswith("ctranslate2") else None


def available(engine: str) -> bool:
    return importlib.util.find_spec(_MODULES[engine.split(":")[0]]) is not None


def main(argv: list[str] | None = None) -> int:
    parser = add_bench_flags(argparse.ArgumentParser(description=__doc__.splitlines()[0]), ENGINES)
    args = parser.parse_args(argv)
    try:
        if args.cell:
            engine, workload = args.cell
            family, dtype = engine.split(":")
            result = measure(engine, workload, args.scale, lambda w: RUNNERS[family](dtype, w, args.model),
                             counted=lambda w: counted_tokens(engine, w))
            print(json.dumps(asdict(result)))
            return 0
        workloads, engines = parse_names(args, ENGINES)
    except ValueError as e:
        print(f"compare.py: error: {e}", file=sys.stderr)
        return 2
    skipped = [e for e in engines if not available(e)]
    engines = [e for e in engines if e not in skipped]
    if skipped:
        print(f"not installed, skipped: {', '.join(skipped)} (make bench-peers installs them)", file=sys.stderr)
    results = []
    for wl in workloads:
        for engine in engines:
            print(f"running {engine} on {wl} ...", file=sys.stderr, flush=True)
            cmd = [sys.executable, __file__, "--cell", engine, wl, "--scale", str(args.scale)]
            if args.model:
                cmd += ["--model", args.model]
            results.append(run_child(cmd, engine, wl, args.timeout))
    print_report(results, workloads, engines, "benchmarks/compare.py", args.scale, "transformers:float32",
                 args.json_out)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))  # llama_cpp_batched.py
    sys.exit(main())

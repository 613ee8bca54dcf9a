"""`nextok bench`: throughput of nextok against transformers, llama.cpp and CTranslate2, side by side.

Every cell (engine x dtype x workload) runs in its own subprocess so that its peak memory is its
own; the parent prints one table with ratios to transformers fp32 measured in the same run.
EOS is suppressed everywhere, so every engine generates exactly the same number of tokens.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

WORKLOADS = {
    "greedy-1": "greedy, batch 1, 128 new tokens",
    "beam-5": "beam search, 5 beams, 40 new tokens",
    "sample-16": "16 prompts sampled (top_k 50), 128 new tokens each",
    "mixed-64": "64 prompts, 10-300 prompt tokens, 32-256 new tokens each",
}
ENGINES = ["transformers:float32", "transformers:bfloat16", "nextok:float32", "nextok:bfloat16", "nextok:int8",
           "llama.cpp:q4_1", "ctranslate2:float32", "ctranslate2:int8"]
_MODULES = {"nextok": "nextok", "transformers": "transformers", "llama.cpp": "llama_cpp", "ctranslate2": "ctranslate2"}
_WORDS = ("the quick brown fox jumps over a lazy dog while people walk along the river and talk about "
          "music books weather science history cooking travel gardens cities mountains and the sea").split()


@dataclass
class Workload:
    prompts: list[str]
    max_new_tokens: list[int]
    num_beams: int = 1
    do_sample: bool = False

    @property
    def new_tokens(self) -> int:
        """Tokens the user receives (beam search returns one sequence per prompt)."""
        return sum(self.max_new_tokens)


@dataclass
class CellResult:
    engine: str
    workload: str
    tokens_per_s: float
    ttft_s: float
    peak_mb: float
    seconds: float
    error: str | None = None


def make_workload(name: str, scale: float = 1.0) -> Workload:
    rng = random.Random(0)

    def prompt(n_words: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(n_words))

    s = lambda n: max(1, int(n * scale))  # noqa: E731
    if name == "greedy-1":
        return Workload([prompt(12)], [s(128)])
    if name == "beam-5":
        return Workload(["I enjoy walking with my cute dog"], [s(40)], num_beams=5)
    if name == "sample-16":
        return Workload([prompt(rng.randint(8, 24)) for _ in range(16)], [s(128)] * 16, do_sample=True)
    if name == "mixed-64":
        n = max(2, int(64 * scale))
        return Workload([prompt(rng.randint(10, 300)) for _ in range(n)], [s(rng.randint(32, 256)) for _ in range(n)])
    raise ValueError(f"--workloads: unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------------- engines (run in the child)
def _run_nextok(dtype: str, w: Workload, model_path: str | None):
    from nextok import LLM, SamplingParams

    llm = LLM(model_path, dtype=dtype)

    def params(n: int, new: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=new, num_beams=w.num_beams, do_sample=w.do_sample, top_k=50,
                              seed=n, ignore_eos=True)

    def run(max_new: list[int]) -> None:
        llm.generate(w.prompts, [params(i, m) for i, m in enumerate(max_new)], use_tqdm=False)

    return run


def _run_transformers(dtype: str, w: Workload, model_path: str | None):
    import torch
    import transformers

    from nextok.models.loader import default_model_path

    path = default_model_path() if model_path is None else __import__("pathlib").Path(model_path)
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
    common = dict(eos_token_id=None, pad_token_id=tok.pad_token_id, do_sample=w.do_sample, top_k=50,
                  num_beams=w.num_beams)
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


def _run_llama_cpp(dtype: str, w: Workload, model_path: str | None):
    import os

    import llama_cpp

    from nextok.models.loader import default_model_path

    path = str(default_model_path() if model_path is None else model_path)
    llm = llama_cpp.Llama(path, n_ctx=2048, n_batch=512, n_threads=os.cpu_count(), verbose=False,
                          logits_all=False, n_seq_max=1)
    eos = llm.token_eos()

    def run(max_new: list[int]) -> None:
        for i, (p, m) in enumerate(zip(w.prompts, max_new)):
            llm.reset()
            llm.create_completion(p, max_tokens=m, temperature=0.8 if w.do_sample else 0.0, top_k=50, seed=i,
                                  logit_bias={eos: float("-inf")})
    if w.num_beams > 1:
        raise RuntimeError("llama.cpp has no beam search")
    return run


def _run_ctranslate2(dtype: str, w: Workload, model_path: str | None):
    import os
    import tempfile
    from pathlib import Path

    import ctranslate2

    from nextok.models.loader import default_model_path, load_checkpoint, gguf_cache_folder, default_cache_dir
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
        if len(set(max_new)) == 1:
            gen.generate_batch(tokens, max_length=max_new[0], min_length=max_new[0], include_prompt_in_result=False,
                               beam_size=w.num_beams, sampling_topk=50 if w.do_sample else 1, max_batch_size=16)
            return
        for t, m in zip(tokens, max_new):  # different budgets: one call per prompt, batched by CTranslate2 itself
            gen.generate_batch([t], max_length=m, min_length=m, include_prompt_in_result=False,
                               sampling_topk=50 if w.do_sample else 1)
    return run


RUNNERS = {"nextok": _run_nextok, "transformers": _run_transformers, "llama.cpp": _run_llama_cpp,
           "ctranslate2": _run_ctranslate2}


def run_cell(engine: str, workload_name: str, scale: float, model_path: str | None) -> CellResult:
    family, dtype = engine.split(":")
    w = make_workload(workload_name, scale)
    run = RUNNERS[family](dtype, w, model_path)
    run([1] * len(w.prompts))  # warm-up: load, allocate, first-call overheads
    start = time.perf_counter()
    run([1] * len(w.prompts))
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    run(w.max_new_tokens)
    seconds = time.perf_counter() - start
    return CellResult(engine, workload_name, w.new_tokens / seconds, ttft, peak_rss_mb(), seconds)


# ---------------------------------------------------------------------- the parent: table with ratios
def _child(engine: str, workload: str, scale: float, model: str | None, timeout: float) -> CellResult:
    cmd = [sys.executable, "-m", "nextok.bench", "--cell", engine, workload, "--scale", str(scale)]
    if model:
        cmd += ["--model", model]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return CellResult(engine, workload, float("nan"), float("nan"), float("nan"), timeout, "timed out")
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        reason = (out.stderr.strip().splitlines() or ["failed"])[-1][:120]
        return CellResult(engine, workload, float("nan"), float("nan"), float("nan"), 0.0, reason)
    return CellResult(**json.loads(lines[-1]))


def available(engine: str) -> bool:
    import importlib.util

    module = _MODULES[engine.split(":")[0]]
    return importlib.util.find_spec(module) is not None


def format_table(results: list[CellResult], workloads: list[str], engines: list[str]) -> str:
    lines = ["| workload | engine | new tok/s | x transformers fp32 | TTFT s | peak MB |", "|---|---|---|---|---|---|"]
    for wl in workloads:
        base = next((r.tokens_per_s for r in results if r.workload == wl and r.engine == "transformers:float32"), None)
        for engine in engines:
            r = next((r for r in results if r.workload == wl and r.engine == engine), None)
            if r is None:
                continue
            if r.error:
                lines.append(f"| {wl} | {engine} | n/a ({r.error}) | | | |")
                continue
            ratio = f"{r.tokens_per_s / base:.2f}x" if base else "n/a"
            lines.append(f"| {wl} | {engine} | {r.tokens_per_s:.1f} | {ratio} | {r.ttft_s:.3f} | {r.peak_mb:.0f} |")
    return "\n".join(lines)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="nextok bench", description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated, from: {', '.join(WORKLOADS)}")
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help="comma-separated engine:dtype cells; those not installed are skipped")
    parser.add_argument("--scale", type=float, default=1.0, help="scale token counts (0.25 for a quick look)")
    parser.add_argument("--model", default=None, help="model (default: the embedded SmolLM2 GGUF)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per cell at most")
    parser.add_argument("--json", dest="json_out", help="also write every cell's result to this JSON file")
    parser.add_argument("--cell", nargs=2, metavar=("ENGINE", "WORKLOAD"), help=argparse.SUPPRESS)
    return parser


def run_bench(args: argparse.Namespace) -> int:
    if args.cell:
        print(json.dumps(asdict(run_cell(args.cell[0], args.cell[1], args.scale, args.model))))
        return 0
    workloads = [w for w in args.workloads.split(",") if w]
    for w in workloads:
        make_workload(w)  # validates the name
    engines = [e for e in args.engines.split(",") if e]
    for e in engines:
        if e not in ENGINES:
            raise ValueError(f"--engines: unknown cell {e!r}; choose from {', '.join(ENGINES)}")
    skipped = [e for e in engines if not available(e)]
    engines = [e for e in engines if e not in skipped]
    if skipped:
        print(f"not installed, skipped: {', '.join(skipped)} (make bench-peers installs them)", file=sys.stderr)
    results = []
    for wl in workloads:
        for engine in engines:
            print(f"running {engine} on {wl} ...", file=sys.stderr, flush=True)
            results.append(_child(engine, wl, args.scale, args.model, args.timeout))
    print(f"nextok bench, {time.strftime('%Y-%m-%d')}, scale {args.scale}")
    for wl in workloads:
        print(f"- {wl}: {WORKLOADS[wl]}")
    print(format_table(results, workloads, engines))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return 0


def register_bench_command(sub) -> None:
    bench = sub.add_parser("bench", help="throughput against transformers, llama.cpp and CTranslate2",
                           description=__doc__.splitlines()[0])
    build_parser(bench)
    bench.set_defaults(func=run_bench)


if __name__ == "__main__":
    sys.exit(run_bench(build_parser().parse_args()))

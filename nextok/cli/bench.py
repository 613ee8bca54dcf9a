"""`nextok bench`: nextok's own throughput on the standard workloads, on this machine.

Every cell (dtype x workload) runs in its own subprocess so that its peak memory is its own. EOS is
suppressed, so every cell generates exactly the workload's tokens. The comparison with transformers,
llama.cpp and CTranslate2 (`benchmarks/compare.py`) runs the same workloads and the same cells.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

WORKLOADS = {
    "greedy-1": "greedy, batch 1, 128 new tokens",
    "beam-5": "beam search, 5 beams, 40 new tokens",
    "sample-16": "16 prompts sampled (temperature 1, top_k 50), 128 new tokens each",
    "mixed-64": "64 prompts, 10-300 prompt words, 32-256 new tokens each, greedy",
}
NEXTOK_CELLS = ["nextok:float32", "nextok:bfloat16", "nextok:int8"]
TOP_K = 50  # every engine samples with temperature 1 and this top-k
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
    prefill_s: float  # the whole workload with one new token per prompt (its prompts' prefill)
    peak_mb: float
    seconds: float
    error: str | None = None
    load_s: float = float("nan")  # building the runner: loading the model and whatever the engine sets up


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


Runner = Callable[[list[int]], None]  # runs the workload with these max_new_tokens per prompt


def nextok_runner(dtype: str, w: Workload, model_path: str | None) -> Runner:
    from nextok import LLM, SamplingParams

    llm = LLM(model_path, dtype=dtype)

    def params(n: int, new: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=new, num_beams=w.num_beams, do_sample=w.do_sample, top_k=TOP_K,
                              seed=n, ignore_eos=True)

    def run(max_new: list[int]) -> None:
        llm.generate(w.prompts, [params(i, m) for i, m in enumerate(max_new)], use_tqdm=False)

    return run


def measure(engine: str, workload_name: str, scale: float, make_runner: Callable[[Workload], Runner],
            counted: Callable[[Workload], int | None] | None = None) -> CellResult:
    """Warm up, time the one-token workload (the prompts' prefill), then time the whole workload.

    counted: the tokens the engine really generates, where it cannot stop at each prompt's budget
    (default: the workload's own count).
    """
    w = make_workload(workload_name, scale)
    start = time.perf_counter()
    run = make_runner(w)
    load = time.perf_counter() - start
    run([1] * len(w.prompts))  # warm-up: load, allocate, first-call overheads
    start = time.perf_counter()
    run([1] * len(w.prompts))
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    run(w.max_new_tokens)
    seconds = time.perf_counter() - start
    tokens = (counted(w) if counted else None) or w.new_tokens
    return CellResult(engine, workload_name, tokens / seconds, prefill, peak_rss_mb(), seconds, load_s=load)


def run_child(cmd: list[str], engine: str, workload: str, timeout: float) -> CellResult:
    """Run one cell in a subprocess that prints its CellResult as a JSON line."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return CellResult(engine, workload, float("nan"), float("nan"), float("nan"), timeout, "timed out")
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        reason = (out.stderr.strip().splitlines() or ["failed"])[-1][:120]
        return CellResult(engine, workload, float("nan"), float("nan"), float("nan"), 0.0, reason)
    return CellResult(**json.loads(lines[-1]))


def format_table(results: list[CellResult], workloads: list[str], engines: list[str],
                 baseline: str = "transformers:float32") -> str:
    """One row per cell; the ratio is against `baseline`'s cell of the same workload in the same run."""
    lines = [f"| workload | engine | new tok/s | x {baseline} | 1-token run s | load s | peak MB |",
             "|---|---|---|---|---|---|---|"]
    for wl in workloads:
        base = next((r.tokens_per_s for r in results if r.workload == wl and r.engine == baseline and not r.error), None)
        for engine in engines:
            r = next((r for r in results if r.workload == wl and r.engine == engine), None)
            if r is None:
                continue
            if r.error:
                lines.append(f"| {wl} | {engine} | n/a ({r.error}) | | | | |")
                continue
            ratio = f"{r.tokens_per_s / base:.2f}x" if base else "n/a"
            lines.append(f"| {wl} | {engine} | {r.tokens_per_s:.1f} | {ratio} | {r.prefill_s:.3f} | {r.load_s:.2f} | {r.peak_mb:.0f} |")
    return "\n".join(lines)


def parse_names(args: argparse.Namespace, known_engines: list[str]) -> tuple[list[str], list[str]]:
    """--workloads and --engines, checked: an unknown name is one ValueError naming the choices."""
    workloads = [w for w in args.workloads.split(",") if w]
    for w in workloads:
        make_workload(w)
    engines = [e for e in args.engines.split(",") if e]
    for e in engines:
        if e not in known_engines:
            raise ValueError(f"--engines: unknown cell {e!r}; choose from {', '.join(known_engines)}")
    return workloads, engines


def add_bench_flags(parser: argparse.ArgumentParser, engines: list[str]) -> argparse.ArgumentParser:
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, from: {', '.join(WORKLOADS)}")
    parser.add_argument("--engines", default=",".join(engines), help=f"comma-separated cells, from: {', '.join(engines)}")
    parser.add_argument("--scale", type=float, default=1.0, help="scale token counts (0.25 for a quick look)")
    parser.add_argument("--model", default=None, help="model (default: the embedded SmolLM2 GGUF)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per cell at most")
    parser.add_argument("--json", dest="json_out", help="also write every cell's result to this JSON file")
    parser.add_argument("--cell", nargs=2, metavar=("ENGINE", "WORKLOAD"), help=argparse.SUPPRESS)
    return parser


def print_report(results: list[CellResult], workloads: list[str], engines: list[str], title: str, scale: float,
                 baseline: str, json_out: str | None) -> None:
    print(f"{title}, {time.strftime('%Y-%m-%d')}, scale {scale}")
    for wl in workloads:
        print(f"- {wl}: {WORKLOADS[wl]}")
    print(format_table(results, workloads, engines, baseline))
    if json_out:
        with open(json_out, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)


def run_bench(args: argparse.Namespace) -> int:
    if args.cell:
        engine, workload = args.cell
        dtype = engine.split(":")[1]
        result = measure(engine, workload, args.scale, lambda w: nextok_runner(dtype, w, args.model))
        print(json.dumps(asdict(result)))
        return 0
    workloads, engines = parse_names(args, NEXTOK_CELLS)
    results = []
    for wl in workloads:
        for engine in engines:
            print(f"running {engine} on {wl} ...", file=sys.stderr, flush=True)
            cmd = [sys.executable, "-m", "nextok.cli", "bench", "--cell", engine, wl, "--scale", str(args.scale)]
            if args.model:
                cmd += ["--model", args.model]
            results.append(run_child(cmd, engine, wl, args.timeout))
    print_report(results, workloads, engines, "nextok bench", args.scale, "nextok:float32", args.json_out)
    print("(benchmarks/compare.py runs the same cells beside transformers, llama.cpp and CTranslate2)")
    return 0


def register_bench_command(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="nextok's throughput on the standard workloads, on this machine",
                           description=__doc__.splitlines()[0])
    add_bench_flags(bench, NEXTOK_CELLS)
    bench.set_defaults(func=run_bench)

"""Long prompts: prefill speed against llama.cpp and transformers, and a short request's first token
while a long prompt is being prefilled.

    .venv/bin/python benchmarks/long_prompt.py [--lengths 512,2048,8000] [--engines nextok,llama.cpp,transformers]

1. Prefill tokens/s: one prompt of each length (the same random token ids for every engine), timed from
   the request to its first new token (nextok float32 through LLM.generate with its default step budget;
   llama.cpp's batch API in batches of 512 tokens, as llama-cli processes a prompt, on the same GGUF file;
   transformers float32, one forward pass). Each engine runs in its own process, after a warm-up.
2. Time to first token of a 4-token streaming request sent 1 s after an 8,000-token prompt, through
   `nextok serve` (the long request asks for one new token, so it is all prefill).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent


def prompt_ids(length: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed + length)
    return [rng.randrange(200, 40000) for _ in range(length)]  # ordinary tokens of the default vocabulary


# ---------------------------------------------------------------------- one engine (in a child process)
def prefill_nextok(lengths: list[int]) -> dict[int, float]:
    from nextok import LLM, SamplingParams

    llm = LLM(dtype="float32")
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)
    llm.generate(prompt_token_ids=[prompt_ids(64, seed=1)], params=params, use_tqdm=False)  # warm-up
    out = {}
    for n in lengths:
        start = time.perf_counter()
        llm.generate(prompt_token_ids=[prompt_ids(n)], params=params, use_tqdm=False)
        out[n] = n / (time.perf_counter() - start)
    return out


def prefill_llama_cpp(lengths: list[int]) -> dict[int, float]:
    sys.path.insert(0, str(BENCHMARKS))
    from llama_cpp_batched import LlamaCppBatched

    from nextok.paths import default_model_path

    llm = LlamaCppBatched(str(default_model_path()), n_ctx=max(lengths) + 64, n_seq=1, n_batch=512)
    llm.generate([prompt_ids(64, seed=1)], [1], sample=False)  # warm-up
    out = {}
    for n in lengths:
        start = time.perf_counter()
        llm.generate([prompt_ids(n)], [1], sample=False)
        out[n] = n / (time.perf_counter() - start)
    return out


def prefill_transformers(lengths: list[int]) -> dict[int, float]:
    import torch
    import transformers

    from nextok.paths import default_model_path

    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    out = {}
    with torch.inference_mode():
        model(torch.tensor([prompt_ids(64, seed=1)]))  # warm-up
        for n in lengths:
            start = time.perf_counter()
            model(torch.tensor([prompt_ids(n)]), logits_to_keep=1)
            out[n] = n / (time.perf_counter() - start)
    return out


ENGINES = {"nextok": prefill_nextok, "llama.cpp": prefill_llama_cpp, "transformers": prefill_transformers}


# ---------------------------------------------------------------------- the server case
def first_token_during_long_prefill(long_tokens: int, delay_s: float = 1.0) -> dict[str, float]:
    import threading

    import httpx

    port = 8791
    script = Path(sys.executable).with_name("nextok")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "nextok.cli"]
    server = subprocess.Popen([*command, "serve", "--port", str(port), "--dtype", "float32"],
                              stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("nextok serve did not start")
            time.sleep(0.2)
        long_body = {"prompt": prompt_ids(long_tokens), "max_tokens": 1, "temperature": 0}
        timings: dict[str, float] = {}

        def long_request() -> None:
            start = time.monotonic()
            httpx.post(url + "/v1/completions", json=long_body, timeout=600)
            timings["long_s"] = time.monotonic() - start

        thread = threading.Thread(target=long_request)
        thread.start()
        time.sleep(delay_s)
        start = time.monotonic()
        body = {"prompt": "Once upon a", "max_tokens": 4, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    timings["short_first_token_s"] = time.monotonic() - start
                    break
        thread.join()
        return timings
    finally:
        server.terminate()
        server.wait(30)


# ---------------------------------------------------------------------- the table
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,2048,8000", help="prompt lengths in tokens")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"from: {', '.join(ENGINES)}")
    parser.add_argument("--no-server", action="store_true", help="skip the time-to-first-token case")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",") if n]
    if args.child:
        print(json.dumps(ENGINES[args.child](lengths)))
        return 0
    engines = [e for e in args.engines.split(",") if e]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        print(f"long_prompt.py: error: unknown engines {unknown}; choose from {', '.join(ENGINES)}", file=sys.stderr)
        return 2
    results = {}
    for engine in engines:
        print(f"prefill on {engine} ...", file=sys.stderr, flush=True)
        out = subprocess.run([sys.executable, __file__, "--child", engine, "--lengths", args.lengths],
                             capture_output=True, text=True, env={**os.environ})
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        results[engine] = {int(k): v for k, v in json.loads(lines[-1]).items()} if lines else None
        if not lines:
            print(f"  {engine} failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
    print(f"benchmarks/long_prompt.py, {time.strftime('%Y-%m-%d')}: prefill tokens/s (one prompt, float32 nextok "
          "and transformers, llama.cpp on the Q4_1 file)")
    header = "| prompt tokens | " + " | ".join(engines) + " | nextok / llama.cpp | nextok / transformers |"
    print(header)
    print("|---" * (len(engines) + 3) + "|")
    for n in lengths:
        cells = [f"{results[e][n]:.0f}" if results.get(e) else "n/a" for e in engines]
        ratios = []
        for peer in ("llama.cpp", "transformers"):
            have = results.get("nextok") and results.get(peer)
            ratios.append(f"{results['nextok'][n] / results[peer][n]:.2f}x" if have else "n/a")
        print(f"| {n} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    if not args.no_server:
        print("time to first token of a 4-token request sent 1 s after an 8000-token prompt (nextok serve):",
              file=sys.stderr)
        timings = first_token_during_long_prefill(8000)
        print(f"\nshort request's first token: {timings['short_first_token_s']:.2f} s after it was sent, while the "
              f"8000-token prompt took {timings['long_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

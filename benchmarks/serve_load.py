"""Load test of `nextok serve`: N concurrent streaming clients for T seconds on loopback.

    python benchmarks/serve_load.py --clients 32 --duration 60            # starts `nextok serve` itself
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --clients 8 --duration 10

Each client sends streaming chat completions back to back until the time is up; requests in flight
then finish (bounded by --grace). Every response is checked complete: a finish_reason, the usage
chunk and `data: [DONE]`. Reports requests completed, errors, output tokens/s, time to first token
and latency p50/p99. Bounded in count (--max-requests) and time (--duration + --grace).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is in two sentences.",
    "Give three tips for learning to cook.",
    "What is the capital of France, and why is it famous?",
    "Describe a cat to someone who has never seen one.",
    "Summarise the plot of a heist movie you invent.",
    "List five fruits and one fact about each.",
    "How does a bicycle stay upright?",
]


@dataclass
class Stats:
    started: int = 0
    completed: int = 0
    errors: int = 0
    incomplete: int = 0
    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)

    def fail(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what)


async def one_request(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, seed: int,
                      stats: Stats) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.7, "seed": seed, "stream": True, "stream_options": {"include_usage": True}}
    stats.started += 1
    start = time.perf_counter()
    first = None
    finish, usage, done = None, None, False
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                stats.fail(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    stats.fail(f"stream error: {chunk['error']}")
                    return
                for choice in chunk.get("choices", []):
                    if first is None and choice.get("delta", {}).get("content"):
                        first = time.perf_counter()
                    finish = choice.get("finish_reason") or finish
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        stats.fail(f"{type(e).__name__}: {e}")
        return
    end = time.perf_counter()
    if not (done and finish in ("stop", "length") and usage):
        stats.incomplete += 1
        stats.fail(f"incomplete response: done={done} finish={finish} usage={usage}")
        return
    stats.completed += 1
    stats.tokens += usage["completion_tokens"]
    stats.latency.append(end - start)
    stats.ttft.append((first or end) - start)


async def client_loop(client: httpx.AsyncClient, index: int, model: str, args, stop_at: float, stats: Stats) -> None:
    i = 0
    while time.monotonic() < stop_at and stats.started < args.max_requests:
        prompt = PROMPTS[(index + i) % len(PROMPTS)]
        await one_request(client, model, prompt, args.max_tokens, seed=index * 100003 + i, stats=stats)
        i += 1


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def run(url: str, args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    timeout = httpx.Timeout(args.request_timeout, connect=10)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=timeout) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        stats = Stats()
        begin = time.monotonic()
        stop_at = begin + args.duration
        tasks = [asyncio.create_task(client_loop(client, i, model, args, stop_at, stats)) for i in range(args.clients)]
        _, pending = await asyncio.wait(tasks, timeout=args.duration + args.grace)
        for task in pending:  # past the hard bound: what is still running counts as lost
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        elapsed = time.monotonic() - begin
        health = (await client.get("/health")).json()
    lost = stats.started - stats.completed - stats.errors
    return {
        "model": model, "clients": args.clients, "duration_s": round(elapsed, 1),
        "requests_completed": stats.completed, "errors": stats.errors, "incomplete": stats.incomplete, "lost": lost,
        "output_tokens": stats.tokens, "tokens_per_s": round(stats.tokens / elapsed, 1),
        "requests_per_s": round(stats.completed / elapsed, 2),
        "ttft_p50_s": round(percentile(stats.ttft, 50), 3), "ttft_p99_s": round(percentile(stats.ttft, 99), 3),
        "latency_p50_s": round(percentile(stats.latency, 50), 3),
        "latency_p99_s": round(percentile(stats.latency, 99), 3),
        "server_peak_batch": health.get("peak_batch"), "error_samples": stats.error_samples,
    }


def start_server(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(sys.executable).parent / "nextok"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "nextok.cli"]
    command += ["serve", "--host", "127.0.0.1", "--port", str(port), "--max-queue", str(max(256, args.clients))]
    if args.model:
        command += ["--model", args.model]
    if args.dtype:
        command += ["--dtype", args.dtype]
    if args.api_key:
        command += ["--api-key", args.api_key]
    proc = subprocess.Popen(command, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("serve_load: the server did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start `nextok serve` on a free loopback port)")
    parser.add_argument("--model", help="model for the server this script starts (default: the default model)")
    parser.add_argument("--dtype", help="dtype for the server this script starts (default: auto)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--clients", type=int, default=32, help="concurrent streaming clients (default: 32)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds to send new requests (default: 60)")
    parser.add_argument("--grace", type=float, default=60.0, help="seconds after that for requests in flight")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request (default: 64)")
    parser.add_argument("--max-requests", type=int, default=100_000, help="requests to send at most")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="client timeout per request")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()
    if args.clients < 1 or args.duration <= 0 or args.max_requests < 1:
        parser.error("--clients, --duration and --max-requests must be positive")
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args)
    try:
        figures = asyncio.run(run(url.rstrip("/"), args))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    if args.json:
        print(json.dumps(figures))
    else:
        width = max(len(k) for k in figures)
        for key, value in figures.items():
            print(f"{key:<{width}}  {value}")
    ok = figures["errors"] == 0 and figures["lost"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Load time of a GGUF model: nextok (first load into an empty cache, then cached) next to transformers.

    python benchmarks/load_time.py [--model PATH.gguf] [--repeat 3]

All numbers come from this one run on this machine; the ratio is transformers' time over nextok's.
transformers' time is `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`, which returns a ready
model; the "+ build_model" row is the comparable nextok figure (checkpoint load + model construction).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from nextok.models.loader import load_checkpoint
from nextok.paths import default_model_path


def timed(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="a GGUF file (default: the embedded SmolLM2)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; the best is shown")
    args = parser.parse_args()
    path = args.model or default_model_path()

    from transformers import AutoModelForCausalLM  # imported before timing, as nextok's modules are

    def nextok_first() -> None:
        with tempfile.TemporaryDirectory() as empty_cache:
            load_checkpoint(path, cache_dir=Path(empty_cache))

    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as cache:
        load_checkpoint(path, cache_dir=Path(cache))  # fills the cache for the cached rows
        rows.append(("nextok load_checkpoint, first load (empty cache)", timed(nextok_first, args.repeat)))
        rows.append(("nextok load_checkpoint, cached", timed(lambda: load_checkpoint(path, cache_dir=Path(cache)),
                                                            args.repeat)))
        try:
            from nextok.models.registry import build_model
        except ImportError:
            build_model = None
        if build_model is not None:
            def cached_model() -> None:
                ckpt = load_checkpoint(path, cache_dir=Path(cache))
                build_model(ckpt.config, ckpt.state_dict)

            rows.append(("nextok cached load + build_model", timed(cached_model, args.repeat)))
    reference = timed(lambda: AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                   dtype=torch.float32), args.repeat)
    rows.insert(0, ("transformers from_pretrained(gguf_file=...)", reference))

    size_mb = path.stat().st_size / 1e6
    print(f"\n{path.name} ({size_mb:.0f} MB), float32, torch threads: {torch.get_num_threads()}, "
          f"best of {args.repeat}")
    width = max(len(name) for name, _ in rows)
    print(f"{'':{width}}  {'seconds':>8}  {'vs transformers':>15}")
    for name, seconds in rows:
        print(f"{name:{width}}  {seconds:8.3f}  {reference / seconds:14.1f}x")


if __name__ == "__main__":
    main()

"""`nextok batch`: the command line of batch jobs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nextok.cli.common import add_model_flags, add_sampling_flags, kv_cache_bytes, load_llm, sampling_params_from_args


def register_batch_command(sub: argparse._SubParsersAction) -> None:
    """Add `nextok batch` to the CLI's subparsers."""
    p = sub.add_parser(
        "batch", help="generate for every line of a JSONL / Parquet file; resumable",
        description="Generate for every request of INPUT (JSONL or Parquet; nextok's form or the OpenAI batch "
                    "form, mixed or not) and write one record per request to OUTPUT, keyed by id, as requests "
                    "finish. Rerun the same command after a crash to finish the rest. Flags set defaults that each "
                    "line may override. A request without a seed is seeded from its id, so sampled results are the "
                    "same whether the job ran in one go or was resumed. A line that is invalid, or that fails in "
                    "the engine, becomes an error record and the job goes on (exit status 0; the summary counts "
                    "errors by code).",
        epilog="Rerun rule: results are kept. Error records of lines that failed in the engine (server_error) "
               "are retried. Error records of invalid lines (invalid_json, missing_id, duplicate_id, "
               "missing_prompt, invalid_parameter, invalid_request) are kept while the line is unchanged: "
               "each keeps a hash of its line (and of the sampling flags), so once you fix the line in INPUT "
               "the rerun runs it again and its new record replaces the old one; error records whose line is "
               "no longer in INPUT are dropped. OUTPUT ends with exactly one record per id (a later line "
               "repeating an id gets a duplicate_id record of its own). A kill at any point, the Parquet finish "
               "included, loses no finished record. (--ray jobs are not resumable.)")
    p.add_argument("input", help="JSONL or .parquet file (with --ray: any path or folder Ray Data reads)")
    p.add_argument("output", help="JSONL or .parquet file (with --ray: a folder)")
    p.add_argument("--max-in-flight", type=int, default=256, help="requests in the engine at once (default: 256)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    ray = p.add_argument_group("Ray (a cluster: set RAY_ADDRESS, or a local Ray is started)")
    ray.add_argument("--ray", action="store_true", help="run on Ray Data: a pool of actors, each with an engine")
    ray.add_argument("--replicas", type=int, default=1, help="actors in the pool (default: 1)")
    ray.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor (default: 0)")
    ray.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per actor (default: 1)")
    ray.add_argument("--ray-batch-size", type=int, default=64, help="requests per actor call (default: 64)")
    add_model_flags(p)
    add_sampling_flags(p)
    p.set_defaults(func=_batch_command)


def _batch_command(args: argparse.Namespace) -> int:
    from nextok.batch.job import run_batch

    params = sampling_params_from_args(args)
    if args.max_in_flight < 1:
        raise ValueError(f"--max-in-flight={args.max_in_flight} is invalid: use 1 or more")
    if args.ray:
        from nextok.batch.ray_job import run_ray_batch

        memory = kv_cache_bytes(args)
        run_ray_batch(args.input, args.output, model=args.model, params=params, replicas=args.replicas,
                      num_cpus=args.num_cpus, num_gpus=args.num_gpus, batch_size=args.ray_batch_size,
                      dtype=args.dtype, device=args.device, kv_cache_memory=memory, revision=args.revision,
                      gguf_file=args.gguf_file)
        print(f"nextok: wrote {args.output}", file=sys.stderr)
        return 0
    if not Path(args.input).is_file():
        raise FileNotFoundError(f"no input file {args.input!r}")
    summary = run_batch(load_llm(args), args.input, args.output, params, args.max_in_flight,
                        progress=not args.no_progress)
    print(f"nextok: {summary}", file=sys.stderr)
    return 0

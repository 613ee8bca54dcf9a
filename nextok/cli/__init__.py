"""The `nextok` command: parse, build the dataclasses, call the library.

Each subcommand lives in its own module here and imports the library below it; nothing under
nextok/ imports the CLI back.
"""

from __future__ import annotations

import argparse
import sys

from nextok.cli.batch import register_batch_command
from nextok.cli.bench import register_bench_command
from nextok.cli.explain import register_explain_command
from nextok.cli.generate import register_generate_command
from nextok.cli.serve import register_serve_command
from nextok.errors import ModelLoadError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nextok",
        description="Exact, fast text generation: greedy, beam search and sampling, as transformers does them.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in (register_generate_command, register_batch_command, register_serve_command,
                     register_explain_command, register_bench_command):
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, MemoryError, FileNotFoundError, ModelLoadError) as e:
        print(f"nextok: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

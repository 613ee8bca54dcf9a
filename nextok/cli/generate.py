"""`nextok generate`: text for one or more prompts, streamed when there is one."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nextok.cli.common import add_model_flags, add_sampling_flags, load_llm, sampling_params_from_args


def register_generate_command(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="generate text for one or more prompts",
                         description="Generate text. Flags mirror SamplingParams; greedy by default.")
    gen.add_argument("prompt", nargs="*", help="the prompt(s)")
    gen.add_argument("--prompts-file", help="read one prompt per line from FILE (- for stdin)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object per completion")
    add_model_flags(gen)
    add_sampling_flags(gen)
    gen.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    prompts = list(args.prompt)
    if args.prompts_file:
        lines = sys.stdin.read() if args.prompts_file == "-" else Path(args.prompts_file).read_text()
        prompts += [line for line in lines.splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompt: give one as an argument, or --prompts-file FILE (- for stdin)")
    params = sampling_params_from_args(args)
    llm = load_llm(args)
    if args.chat:
        results = [llm.chat([{"role": "user", "content": p}], params) for p in prompts]
    elif len(prompts) == 1 and params.num_return_sequences == 1 and params.num_beams == 1 and not args.json:
        for delta in llm.stream(prompts[0], params):
            print(delta, end="", flush=True)
        print()
        return 0
    else:
        results = llm.generate(prompts, params)
    failed = False
    for i, result in enumerate(results):
        failed |= result.error is not None
        for c in result.outputs:
            if args.json:
                print(json.dumps({"prompt_index": i, "prompt": result.prompt,
                                  "prompt_token_ids": result.prompt_token_ids, "index": c.index, "text": c.text,
                                  "token_ids": c.token_ids, "finish_reason": c.finish_reason, "score": c.score,
                                  "logprobs": c.logprobs}, ensure_ascii=False))
            else:
                header = f"=== prompt {i + 1}" + (f", sequence {c.index + 1}" if len(result.outputs) > 1 else "")
                print(f"{header} (score {c.score:.4f}, {c.finish_reason})")
                print((result.prompt or "") + c.text)
        if result.error is not None:
            print(f"nextok: error: prompt {i + 1} failed: {result.error}", file=sys.stderr)
    return 1 if failed else 0

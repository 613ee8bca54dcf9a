"""The `nextok` command: parse, build the dataclasses, call the library."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

from nextok.params import SamplingParams

_HELP = {
    "max_new_tokens": "how many tokens to generate at most",
    "min_new_tokens": "suppress end tokens until this many are generated",
    "do_sample": "sample instead of greedy / beam search",
    "temperature": "divide logits by this before sampling",
    "top_k": "sample among the k most likely tokens (0: off; applies with --do-sample)",
    "top_p": "sample from the smallest set with this much probability (nucleus)",
    "min_p": "drop tokens below min_p x the top probability",
    "typical_p": "locally typical sampling mass",
    "repetition_penalty": "penalise tokens already in the text (>1 discourages repeats)",
    "no_repeat_ngram_size": "never repeat an n-gram of this size",
    "bad_words_ids": 'token id sequences never to generate, as JSON: "[[12], [7, 8]]"',
    "num_beams": "beam search with this many beams (1: no beam search)",
    "length_penalty": "beam score = log-prob / length**length_penalty",
    "early_stopping": 'beam search stops when num_beams hypotheses are done (give "never" for the canonical search)',
    "num_return_sequences": "how many completions per prompt",
    "presence_penalty": "OpenAI presence penalty",
    "frequency_penalty": "OpenAI frequency penalty",
    "stop": "stop when this text appears (repeat for several)",
    "stop_token_ids": "stop on these token ids",
    "ignore_eos": "keep generating past the end-of-sequence token",
    "seed": "random seed of the request (sampling)",
    "logprobs": "report the top-k log-probabilities of each generated token",
}


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per SamplingParams field; only the flags given are passed on."""
    group = parser.add_argument_group("decoding (SamplingParams)")
    hints = typing.get_type_hints(SamplingParams)
    for f in dataclasses.fields(SamplingParams):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else "none"
        help_text = f"{_HELP.get(f.name, '')} (default: {default})"
        if f.name == "early_stopping":
            group.add_argument(flag, nargs="?", const=True, default=argparse.SUPPRESS,
                               type=_early_stopping, help=help_text)
        elif kind is bool:
            group.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=help_text)
        elif f.name == "stop":
            group.add_argument(flag, action="append", default=argparse.SUPPRESS, help=help_text)
        elif f.name == "stop_token_ids":
            group.add_argument(flag, type=int, nargs="+", default=argparse.SUPPRESS, help=help_text)
        elif f.name == "bad_words_ids":
            group.add_argument(flag, type=json.loads, default=argparse.SUPPRESS, help=help_text)
        else:
            base = int if "int" in str(kind) else float
            group.add_argument(flag, type=base, default=argparse.SUPPRESS, help=help_text)


def sampling_params_from_args(args: argparse.Namespace) -> SamplingParams:
    names = set(SamplingParams.field_names())
    return SamplingParams(**{k: v for k, v in vars(args).items() if k in names})


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", help="HF model folder or .gguf file (default: $NEXTOK_MODEL or SmolLM2-135M-Instruct)")
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "int8"],
                       help="weights dtype: float32 is exact, auto picks the fastest this machine runs well")
    group.add_argument("--device", default="auto", help="auto, cpu or cuda")
    group.add_argument("--kv-cache-gb", type=float, default=None, help="KV cache budget in GiB (default: from free memory)")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the layers' element-wise stages (slower start, faster steps) where "
                            "nextok's CPU kernels are off (NEXTOK_KERNELS=0); with them it only warns")


def load_llm(args: argparse.Namespace):
    from nextok.llm import LLM

    memory = None if args.kv_cache_gb is None else int(args.kv_cache_gb * (1 << 30))
    return LLM(args.model, dtype=args.dtype, device=args.device, kv_cache_memory=memory, compile=args.compile)


def _early_stopping(value: str) -> bool | str:
    lowered = value.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    if lowered == "never":
        return "never"
    raise argparse.ArgumentTypeError(f"--early-stopping takes true, false or never, not {value!r}")


# ---------------------------------------------------------------------- generate
def _generate(args: argparse.Namespace) -> int:
    prompts = list(args.prompt)
    if args.prompts_file:
        lines = sys.stdin.read() if args.prompts_file == "-" else Path(args.prompts_file).read_text()
        prompts += [line for line in lines.splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompt: give one as an argument, or --prompts-file FILE (- for stdin)")
    params = sampling_params_from_args(args)
    llm = load_llm(args)
    if args.chat:
        prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    if len(prompts) == 1 and params.num_return_sequences == 1 and params.num_beams == 1 and not args.json:
        for delta in llm.stream(prompts[0], params):
            print(delta, end="", flush=True)
        print()
        return 0
    results = llm.generate(prompts, params)
    for i, result in enumerate(results):
        for c in result.outputs:
            if args.json:
                print(json.dumps({"prompt_index": i, "prompt": result.prompt, "index": c.index, "text": c.text,
                                  "token_ids": c.token_ids, "finish_reason": c.finish_reason, "score": c.score,
                                  "logprobs": c.logprobs}, ensure_ascii=False))
            else:
                header = f"=== prompt {i + 1}" + (f", sequence {c.index + 1}" if len(result.outputs) > 1 else "")
                print(f"{header} (score {c.score:.4f}, {c.finish_reason})")
                print((result.prompt or "") + c.text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nextok",
        description="Exact, fast text generation: greedy, beam search and sampling, as transformers does them.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate text for one or more prompts",
                         description="Generate text. Flags mirror SamplingParams; greedy by default.")
    gen.add_argument("prompt", nargs="*", help="the prompt(s)")
    gen.add_argument("--prompts-file", help="read one prompt per line from FILE (- for stdin)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object per completion")
    add_model_flags(gen)
    add_sampling_flags(gen)
    gen.set_defaults(func=_generate)
    # Subcommands defined beside the code they drive; imported here so `nextok --help` stays quick
    # for the rest (the server and Ray are only loaded by their own commands).
    from nextok.batch import register_batch_command
    from nextok.bench import register_bench_command
    from nextok.explain.command import register_explain_command
    from nextok.server.cli import register_serve_command

    for register in (register_batch_command, register_serve_command, register_explain_command,
                     register_bench_command):
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, MemoryError, FileNotFoundError) as e:
        print(f"nextok: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

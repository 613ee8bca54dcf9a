"""What every subcommand shares: the SamplingParams flags, the model flags, and loading the model."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing

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
            group.add_argument(flag, type=_json_value, default=argparse.SUPPRESS, help=help_text)
        else:
            base = int if "int" in str(kind) else float
            group.add_argument(flag, type=base, default=argparse.SUPPRESS, help=help_text)


def sampling_params_from_args(args: argparse.Namespace) -> SamplingParams:
    names = set(SamplingParams.field_names())
    return SamplingParams(**{k: v for k, v in vars(args).items() if k in names})


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", help="HF model folder, .gguf file, or Hugging Face Hub id org/name[/file.gguf] "
                                       "(default: $NEXTOK_MODEL or SmolLM2-135M-Instruct)")
    group.add_argument("--revision", help="Hub branch, tag or commit of --model (default: main)")
    group.add_argument("--gguf-file", help="a GGUF file inside the Hub repository (or folder) of --model")
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "int8"],
                       help="weights dtype: float32 is exact; auto: bfloat16 on a GPU or where AMX runs it, else float32")
    group.add_argument("--device", default="auto", help="auto, cpu or cuda")
    group.add_argument("--verbose", action="store_true",
                       help="say on stderr what loading chose (the dtype auto picked and why)")
    group.add_argument("--kv-cache-gb", type=float, default=None, help="KV cache budget in GiB (default: from free memory)")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the layers' element-wise stages (slower start, faster steps) where "
                            "nextok's CPU kernels are off (NEXTOK_KERNELS=0); with them it only warns")


def kv_cache_bytes(args: argparse.Namespace) -> int | None:
    """--kv-cache-gb in bytes (None: sized from free memory); a budget must be positive."""
    if args.kv_cache_gb is None:
        return None
    if not args.kv_cache_gb > 0:
        raise ValueError(f"--kv-cache-gb {args.kv_cache_gb} is invalid: give a size in GiB above 0 "
                         "(or leave it out to size the cache from free memory)")
    return max(1, int(args.kv_cache_gb * (1 << 30)))


def load_llm(args: argparse.Namespace):
    from nextok.llm import LLM

    if getattr(args, "verbose", False):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("nextok: %(message)s"))
        log = logging.getLogger("nextok")
        log.addHandler(handler)
        log.setLevel(logging.INFO)

    return LLM(args.model, dtype=args.dtype, device=args.device, kv_cache_memory=kv_cache_bytes(args),
               compile=args.compile, revision=args.revision, gguf_file=args.gguf_file)


def _json_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {text!r}") from None


def _early_stopping(value: str) -> bool | str:
    lowered = value.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    if lowered == "never":
        return "never"
    raise argparse.ArgumentTypeError(f"--early-stopping takes true, false or never, not {value!r}")

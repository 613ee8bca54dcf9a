"""LLM: load a model and its tokenizer, then generate or stream; a thin layer over the engine."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from nextok import kernels
from nextok.chat import chat_prompt
from nextok.engine.engine import LLMEngine
from nextok.engine.sequence import Request
from nextok.engine.streaming import releasable_end
from nextok.models.hub import resolve_model
from nextok.models.linear import keeps_blocks
from nextok.models.loader import Checkpoint, load_checkpoint
from nextok.models.quantize import quantize_int8
from nextok.models.registry import build_model
from nextok.outputs import RequestOutput
from nextok.params import SamplingParams

logger = logging.getLogger("nextok")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": "int8"}


class LLM:
    """A causal language model with nextok's decoding.

    >>> llm = LLM()                                   # the embedded default model
    >>> llm.generate("I enjoy walking with my cute dog", SamplingParams(max_new_tokens=20))

    model: an HF model folder, a .gguf file, a Hugging Face Hub id ("org/name", "org/name/file.gguf"; a
    local path that exists wins), or None for $NEXTOK_MODEL / the default model. revision: the Hub
    branch, tag or commit; gguf_file: a GGUF inside the Hub repository (see nextok/models/hub.py).
    dtype: "float32" (exact), "bfloat16", "float16", "int8" (weight-only) or "auto" (bfloat16 on a
    GPU or a CPU with AMX, else float32: without AMX, bfloat16 products are nextok's slowest).
    kv_cache_memory: bytes for the KV cache (default: sized from free memory).
    max_num_batched_tokens: tokens one step computes at most; a longer prompt is prefilled in chunks
    of it, mixed with the decode steps of running requests. compile: torch.compile the layers' element-wise stages (slower start, faster
    steps; Llama family) where nextok's CPU kernels do not run the model: where they do, they are
    faster, and compile=True only warns.
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        dtype: str = "auto",
        device: str = "auto",
        kv_cache_memory: int | None = None,
        block_size: int = 16,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 512,
        compile: bool = False,
        revision: str | None = None,
        gguf_file: str | None = None,
    ) -> None:
        if dtype not in (*DTYPES, "auto"):
            raise ValueError(f"dtype={dtype!r} is not supported: use one of auto, {', '.join(DTYPES)}")
        self.device = _resolve_device(device)
        self.dtype, why = _resolve_dtype(dtype, self.device)
        self.dtype_reason = why  # why this dtype: the user's choice, or what "auto" saw on this machine
        logger.info("dtype %s: %s", _dtype_name(self.dtype), why)
        source = resolve_model(model, revision=revision, gguf_file=gguf_file)
        # where the kernels run the model, a GGUF's quantized weights go from the file to their packed blocks
        checkpoint: Checkpoint = load_checkpoint(source.path, blocks=keeps_blocks(self.dtype, self.device))
        self.model_path = source.path
        self.model_name = source.name  # the Hub id for Hub models, else the file's stem or the folder's name
        self.config = checkpoint.config
        self.generation_config = checkpoint.generation_config
        self.tokenizer = checkpoint.tokenizer
        weights_dtype = torch.bfloat16 if self.dtype == "int8" else self.dtype
        self.model = build_model(checkpoint.config, checkpoint.state_dict, weights_dtype, device=self.device,
                                 blocks=self.dtype != "int8").to(self.device)
        if self.dtype == "int8":
            quantize_int8(self.model)
        if compile:
            if not hasattr(self.model, "compile_stages"):
                raise ValueError(f"compile=True is supported for the Llama family, not {type(self.model).__name__}")
            if self.device.type == "cpu" and kernels.library() is not None:
                warnings.warn("compile=True has no effect: nextok's CPU kernels run this model, and they are faster "
                              "than torch.compile'd PyTorch ops here (NEXTOK_KERNELS=0 turns the kernels off)",
                              stacklevel=2)
            else:
                self.model.compile_stages()
        del checkpoint
        _return_freed_memory()  # the loader's buffers, before the KV cache takes its share
        self.eos_token_ids = _eos_token_ids(self.config, self.generation_config, self.tokenizer)
        self.engine = LLMEngine(
            self.model, self.eos_token_ids, tokenizer=self.tokenizer, kv_cache_memory=kv_cache_memory,
            block_size=block_size, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            device=self.device,
        )

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: str | list[str] | None = None,
        params: SamplingParams | list[SamplingParams] | None = None,
        prompt_token_ids: list[list[int]] | None = None,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (continuously batched); one RequestOutput per prompt, in input order."""
        texts, ids = self._prompts(prompts, prompt_token_ids)
        return self._run(texts, ids, self._params(params, len(ids)), use_tqdm)

    def _run(self, texts: list[str | None], ids: list[list[int]], params_list: list[SamplingParams],
             use_tqdm: bool | None) -> list[RequestOutput]:
        """Add the requests and step the engine until they finish. On any exception, Ctrl-C included,
        the requests are taken out of the engine again, so the LLM works on as if they never came."""
        requests: list[Request] = []
        try:
            for text, tokens, p in zip(texts, ids, params_list):
                requests.append(self.engine.add_request(tokens, p, prompt=text))
            show = use_tqdm if use_tqdm is not None else len(requests) > 1 and sys.stderr.isatty()
            with tqdm(total=len(requests), disable=not show, desc="generating", unit="req") as bar:
                done = sum(r.is_finished for r in requests)
                bar.update(done)
                while not all(r.is_finished for r in requests):
                    with _deferred_interrupt():
                        self.engine.step()
                    now = sum(r.is_finished for r in requests)
                    bar.update(now - done)
                    done = now
        except BaseException:
            for r in requests:
                if not r.is_finished:
                    self.engine.abort(r)
            raise
        return [self.engine.output(r) for r in requests]

    def stream(self, prompt: str, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text deltas as they are decoded (the first sample; beam search yields its best at the end).

        A request that fails raises RuntimeError with its message after what it generated.
        """
        (text,), (tokens,) = self._prompts(prompt, None)
        p = self._params(params, 1)[0]
        request = self.engine.add_request(tokens, p, prompt=text, stream=True)
        try:
            yield from self._stream_request(request)
        finally:
            if not request.is_finished:
                self.engine.abort(request)

    def _stream_request(self, request: Request) -> Iterator[str]:
        """Drive the engine and yield the request's new text; holds back what a stop string may still cut."""
        emitted = 0
        while True:
            finished = request.is_finished
            if request.beam is None and (request.seqs or request.finished_seqs):
                seq = min(request.seqs + request.finished_seqs, key=lambda s: s.sample_index)
                end = releasable_end(seq, emitted)
                if end > emitted:
                    yield seq.text[emitted:end]
                    emitted = end
            if finished:
                break
            with _deferred_interrupt():
                self.engine.step()
        if request.error is not None:
            raise RuntimeError(f"generation failed: {request.error}")
        if request.beam is not None:
            best = self.engine.output(request).outputs
            if best:
                yield best[0].text

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | None = None,
             use_tqdm: bool | None = None) -> RequestOutput | list[RequestOutput]:
        """The assistant's next turn of a conversation (a list of {role, content}) with the model's chat
        template; given a list of conversations, one RequestOutput each, generated together."""
        one = bool(messages) and isinstance(messages[0], dict)
        conversations = [messages] if one else list(messages)
        prompts = [chat_prompt(self.tokenizer, m, self.eos_token_ids) for m in conversations]
        params_list = [p.replace(stop_token_ids=[*p.stop_token_ids, *c.stop_token_ids]) if c.stop_token_ids else p
                       for p, c in zip(self._params(params, len(prompts)), prompts)]
        outputs = self._run([c.text for c in prompts], [c.token_ids for c in prompts], params_list,
                            use_tqdm if use_tqdm is not None else False if one else None)
        return outputs[0] if one else outputs

    def trace(self, prompt: str, params: SamplingParams | None = None, top: int = 20) -> "nextok.explain.Trace":
        """Generate for one prompt and record how each token was chosen (`top` candidates per step).

        The trace's outputs equal `generate(prompt, params)` for the same seed; see nextok.explain.
        """
        from nextok.explain.recorder import trace_request

        (text,), (tokens,) = self._prompts(prompt, None)
        return trace_request(self.engine, tokens, self._params(params, 1)[0], prompt=text, top=top)

    # ------------------------------------------------------------------ helpers
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def _prompts(self, prompts, prompt_token_ids) -> tuple[list[str | None], list[list[int]]]:
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("give either prompts (text) or prompt_token_ids, not both or neither")
        if prompt_token_ids is not None:
            if prompt_token_ids and isinstance(prompt_token_ids[0], int):
                prompt_token_ids = [prompt_token_ids]
            return [None] * len(prompt_token_ids), [list(p) for p in prompt_token_ids]
        if isinstance(prompts, str):
            prompts = [prompts]
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a string or a list of strings")
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass prompt_token_ids instead of text")
        return list(prompts), self.tokenizer.encode_batch(list(prompts))

    def _params(self, params, n: int) -> list[SamplingParams]:
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * n
        if len(params) != n:
            raise ValueError(f"got {len(params)} SamplingParams for {n} prompts; give one, or one per prompt")
        return [p.with_model_defaults(self.generation_config) for p in params]


def _eos_token_ids(config: dict, generation_config: dict, tokenizer) -> list[int]:
    for source in (generation_config.get("eos_token_id"), config.get("eos_token_id")):
        if source is not None:
            return [source] if isinstance(source, int) else list(source)
    return list(tokenizer.eos_token_ids) if tokenizer is not None else []


def _return_freed_memory() -> None:
    """Hand freed heap pages back to the OS: glibc keeps them after a load (about 400 MB for the
    default model), which would otherwise count in the process's memory for its whole life."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device={device!r} is not a device: use auto, cpu or cuda") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA GPU is available: use device='cpu'")
    return resolved


def _resolve_dtype(dtype: str, device: torch.device) -> tuple[torch.dtype | str, str]:
    """The dtype to run and why. "auto": bfloat16 on a GPU and where AMX runs nextok's bfloat16 products
    (several times float32's speed for batches there); float32 elsewhere, where bfloat16 is the slowest dtype."""
    if dtype != "auto":
        return DTYPES[dtype], "asked for"
    if device.type == "cuda":
        return torch.bfloat16, "auto on a GPU"
    if kernels.amx_enabled():
        return torch.bfloat16, "auto: this CPU runs AMX bfloat16 tiles"
    if kernels.library() is None:
        return torch.float32, "auto: nextok's CPU kernels are off here (exact float32)"
    return torch.float32, "auto: no AMX on this CPU, where float32 is faster than bfloat16 (and exact)"


def _dtype_name(dtype: torch.dtype | str) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[None]:
    """Ctrl-C during an engine step is raised when the step is done, never halfway through its bookkeeping
    (on the main thread, where signals arrive; elsewhere the step runs as it is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt

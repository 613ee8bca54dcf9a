"""A model where the weights are the cost: Llama-3.2-1B's shape, random weights, as a Q4_K_M GGUF.

    .venv/bin/python benchmarks/model_1b.py        # prints the path, building the file on first use

Hidden 2048, 16 layers, 32 query / 8 key-value heads, feed-forward 8192, tied embeddings, rope theta
500000, and the default model's tokenizer (vocabulary 49152), so every engine reads the same prompts.
The weights are normal(0, 0.02) written as an F16 GGUF with `gguf`, then quantized to Q4_K_M by
llama.cpp's own quantizer (`llama_model_quantize` in llama-cpp-python, installed by `make bench-peers`):
the mix of Q4_K, Q6_K (and Q5_0 / Q8_0 where a row does not fit 256) that people download. Both files
live in nextok's cache folder; the F16 one is removed once the Q4_K_M one exists.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

SHAPE = dict(hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192, rope_theta=500000.0, context=4096)
NAME = "llama-1b-shape-random-Q4_K_M.gguf"


def model_path() -> Path:
    """The Q4_K_M file, built the first time."""
    from nextok.paths import default_cache_dir

    out = default_cache_dir() / "bench-models" / NAME
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        f16 = out.with_name(NAME.replace("Q4_K_M", "F16"))
        if not f16.exists():
            write_f16(f16)
        quantize(f16, out)
        f16.unlink()
    return out


def write_f16(path: Path, seed: int = 0) -> None:
    import gguf

    from nextok.paths import default_model_path

    s = SHAPE
    source = gguf.GGUFReader(default_model_path())
    vocab = len(source.fields["tokenizer.ggml.tokens"].data)
    head_dim = s["hidden"] // s["heads"]
    tmp = path.with_suffix(".tmp")
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name("llama-1b-shape-random")
    w.add_block_count(s["layers"])
    w.add_context_length(s["context"])
    w.add_embedding_length(s["hidden"])
    w.add_feed_forward_length(s["ffn"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(s["rope_theta"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for name, field in source.fields.items():  # the default model's tokenizer, as it is
        if name.startswith("tokenizer."):
            sub = field.types[1] if len(field.types) > 1 else None
            w.add_key_value(name, field.contents(), field.types[0], sub)
    rng = np.random.default_rng(seed)

    def weight(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    h, kv = s["hidden"], s["kv_heads"] * head_dim
    w.add_tensor("token_embd.weight", weight(vocab, h))
    w.add_tensor("output_norm.weight", np.ones(h, dtype=np.float32))
    for i in range(s["layers"]):
        for name, shape in (("attn_q", (h, h)), ("attn_k", (kv, h)), ("attn_v", (kv, h)), ("attn_output", (h, h)),
                            ("ffn_gate", (s["ffn"], h)), ("ffn_up", (s["ffn"], h)), ("ffn_down", (h, s["ffn"]))):
            w.add_tensor(f"blk.{i}.{name}.weight", weight(*shape))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(h, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(h, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=True)
    w.close()
    tmp.replace(path)


def quantize(source: Path, out: Path) -> None:
    import ctypes

    try:
        import llama_cpp
    except ImportError:
        sys.exit("benchmarks/model_1b.py: llama.cpp's quantizer is needed: `make bench-peers` installs it")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 0  # all cores
    tmp = out.with_suffix(".tmp")
    if llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        sys.exit(f"benchmarks/model_1b.py: llama.cpp could not quantize {source}")
    tmp.replace(out)


if __name__ == "__main__":
    print(model_path())

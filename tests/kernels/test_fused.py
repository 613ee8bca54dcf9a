"""The one-call decode step (FusedDecoder) computes what the per-op path computes."""

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from nextok.engine.engine import LLMEngine
from nextok.engine.runner import ModelRunner
from nextok.kernels import library
from nextok.kernels.fused import FusedDecoder
from nextok.models import linear
from nextok.models.quantize import quantize_int8
from nextok.models.registry import build_model
from nextok.params import SamplingParams
from tests.models.helpers import llama_pair

pytestmark = pytest.mark.skipif(library() is None, reason="nextok's CPU kernels need AVX-512 BF16 and a C compiler")

PROMPTS = [[5, 9, 33, 7], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28], [40]]


def _gguf_valued(state_dict: dict) -> dict:
    """The weights as a GGUF file holds them: matrices as Q4_1 blocks, the embeddings and head as Q8_0."""
    out = {}
    for name, w in state_dict.items():
        if w.dim() == 2 and w.shape[1] % 32 == 0:
            qtype = Q.Q8_0 if "embed" in name or "lm_head" in name else Q.Q4_1
            w = torch.from_numpy(gguf_dequantize(gguf_quantize(w.numpy(), qtype), qtype).reshape(w.shape))
        out[name] = w
    return out


def _model(dtype: str, **config):
    ref, model = llama_pair(seed=3, **config)
    if dtype == "float32":
        return model
    if dtype.endswith("-blocks"):
        model = build_model(ref.config.to_dict(), _gguf_valued(ref.state_dict()), getattr(torch, dtype[:-7]))
        assert any(getattr(m, "packed", None) is not None and m.packed.dtype == torch.uint8 for m in model.modules())
        return model
    model = build_model(ref.config.to_dict(), ref.state_dict(), torch.bfloat16)
    return quantize_int8(model) if dtype == "int8" else model


def _run(model, fused: bool, monkeypatch) -> list:
    calls = []
    if fused:
        real = FusedDecoder.__call__
        monkeypatch.setattr(FusedDecoder, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    else:
        monkeypatch.setattr(ModelRunner, "fused_decoder", lambda self: None)
    engine = LLMEngine(model, eos_token_ids=[2], kv_cache_memory=8 << 20, block_size=4)
    requests = [engine.add_request(p, SamplingParams(max_new_tokens=12, ignore_eos=True, logprobs=3)) for p in PROMPTS]
    requests.append(engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=6, num_beams=3, ignore_eos=True)))
    while engine.has_unfinished():
        engine.step()
    monkeypatch.undo()
    outputs = [engine.output(r).outputs for r in requests]
    assert not fused or calls, "the fused decoder was not used"
    return [[(c.token_ids, c.score, c.logprobs) for c in out] for out in outputs]


@pytest.mark.parametrize("dtype", ["float32", "float32-blocks", "bfloat16", "bfloat16-blocks", "int8"])
@pytest.mark.parametrize("config", [{}, {"num_key_value_heads": 4}, {"qwen2": True, "num_key_value_heads": 1},
                                    {"hidden_size": 96, "num_attention_heads": 3, "num_key_value_heads": 3}])
def test_fused_decode_equals_the_per_op_path(dtype, config, monkeypatch):
    model = _model(dtype, **config)
    assert _run(model, True, monkeypatch) == _run(model, False, monkeypatch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_format_weights_give_the_dense_results(dtype, monkeypatch):
    """Weights kept as GGUF blocks (ops.pack_blocks) decode exactly as the dense matrices of the same dtype."""
    ref, _ = llama_pair(seed=3, hidden_size=96, intermediate_size=160, num_attention_heads=3, num_key_value_heads=3)
    state_dict = _gguf_valued(ref.state_dict())
    blocks = build_model(ref.config.to_dict(), state_dict, dtype)
    monkeypatch.setattr(linear, "pack_blocks", lambda weight, dtype: None)
    dense = build_model(ref.config.to_dict(), state_dict, dtype)
    monkeypatch.undo()
    formats = [m.packed.dtype for m in blocks.modules() if getattr(m, "packed", None) is not None]
    assert formats and set(formats) == {torch.uint8}  # all: K is 96 or 160, multiples of 32
    assert all(m.packed.dtype == dtype for m in dense.modules() if getattr(m, "packed", None) is not None)
    assert all(p.dtype == dtype for p in blocks.parameters())
    assert _run(blocks, True, monkeypatch) == _run(dense, True, monkeypatch)


def _caches(dtype=torch.float32, layers=2):
    return [(torch.zeros(4, 4, 2, 16, dtype=dtype), torch.zeros(4, 4, 2, 16, dtype=dtype)) for _ in range(layers)]


def test_not_used_where_it_cannot_apply():
    ref, model = llama_pair(seed=3)
    assert FusedDecoder.build(model.decoder_weights(), _caches()) is not None  # float32 model, kernels on: applies
    assert FusedDecoder.build(model.decoder_weights(), _caches(torch.bfloat16)) is None  # cache dtype != weights
    assert FusedDecoder.build(model.decoder_weights(), _caches(layers=1)) is None  # a cache per layer
    unfused = build_model(ref.config.to_dict(), ref.state_dict(), fuse=False)
    assert unfused.decoder_weights() is None


def test_the_kernels_know_no_model():
    """The fused step reads tensors a model describes: the same description from another model object
    (here: the same weights built again) gives the same key."""
    ref, model = llama_pair(seed=3)
    weights = model.decoder_weights()
    assert all(isinstance(t, torch.Tensor) for t in weights.tensors())
    assert len(weights.layers) == ref.config.num_hidden_layers


def test_a_new_cache_or_new_weights_get_a_new_decoder():
    _, model = llama_pair(seed=3)
    runner = ModelRunner(model, num_blocks=4, block_size=4, kv_dtype=torch.float32)
    decoder = runner.fused_decoder()
    assert decoder is not None and runner.fused_decoder() is decoder
    old = runner.kv_caches
    runner.kv_caches = [old[0], (torch.zeros_like(old[1][0]), torch.zeros_like(old[1][1]))]  # layer 0 kept
    assert runner.fused_decoder() is not decoder
    decoder = runner.fused_decoder()
    quantize_int8(model)  # weights replaced after the engine was made: the old pointers must not be read
    assert runner.fused_decoder() is None or runner.fused_decoder() is not decoder

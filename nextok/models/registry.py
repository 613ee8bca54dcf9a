"""Which model class serves which checkpoint architecture, and building one from a state dict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from nextok.models.attention import AttentionMetadata, LayerKV
from nextok.models.gemma import GemmaConfig, GemmaForCausalLM, language_model_weights
from nextok.models.gpt2 import GPT2Config, GPT2LMHeadModel
from nextok.models.linear import keep_quantized, keeps_blocks, layout_linears, quantized_layers, reads_float32
from nextok.models.llama import LlamaConfig, LlamaForCausalLM, RotaryEmbedding, rope_inv_freq


class CausalLM(Protocol):
    """What the engine needs of a model."""

    kv_shape: tuple[int, int, int]  # (layers, kv heads, head dim)
    max_positions: int

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[LayerKV] | None = None, attn_meta: AttentionMetadata | None = None) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Architecture:
    """What nextok knows of one checkpoint architecture (the name in config.json's `architectures`)."""

    name: str
    model: type[nn.Module]
    config: Any  # the config dataclass, with from_hf(dict)
    model_types: tuple[str, ...]  # config.json `model_type` values that name it
    weight_prefix: str = "model."  # the base model's key prefix in checkpoints
    tied_by_default: bool = False  # transformers' tie_word_embeddings when config.json leaves it out
    gguf_name: str | None = None  # GGUF `general.architecture`


# The one table of supported architectures: the loaders (HF folders, GGUF) and the builder read it.
ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("GPT2LMHeadModel", GPT2LMHeadModel, GPT2Config, ("gpt2",), "transformer.", True, "gpt2"),
    Architecture("LlamaForCausalLM", LlamaForCausalLM, LlamaConfig, ("llama",), gguf_name="llama"),
    Architecture("MistralForCausalLM", LlamaForCausalLM, LlamaConfig, ("mistral",)),
    Architecture("Qwen2ForCausalLM", LlamaForCausalLM, LlamaConfig, ("qwen2",), gguf_name="qwen2"),
    Architecture("Qwen3ForCausalLM", LlamaForCausalLM, LlamaConfig, ("qwen3",), gguf_name="qwen3"),
    Architecture("Phi3ForCausalLM", LlamaForCausalLM, LlamaConfig, ("phi3",), gguf_name="phi3"),
    Architecture("Gemma2ForCausalLM", GemmaForCausalLM, GemmaConfig, ("gemma2",), tied_by_default=True,
                 gguf_name="gemma2"),
    Architecture("Gemma3ForCausalLM", GemmaForCausalLM, GemmaConfig, ("gemma3_text",), tied_by_default=True,
                 gguf_name="gemma3"),
    # its language model only: text in, text out (the vision tower's weights are left out)
    Architecture("Gemma3ForConditionalGeneration", GemmaForCausalLM, GemmaConfig, ("gemma3",), tied_by_default=True),
)}

# Checkpoint entries that are buffers, not weights (old GPT-2 files carry the causal mask).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def find_architecture(config: dict[str, Any]) -> Architecture | None:
    """The architecture a config names (by `architectures`, else `model_type`), or None."""
    for name in config.get("architectures") or []:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    model_type = config.get("model_type")
    return next((a for a in ARCHITECTURES.values() if model_type in a.model_types), None)


def architecture_of(config: dict[str, Any]) -> Architecture:
    found = find_architecture(config)
    if found is None:
        named = config.get("architectures") or config.get("model_type")
        raise ValueError(f"unsupported architecture {named!r}; supported: {', '.join(ARCHITECTURES)}")
    return found


def build_model(config: dict[str, Any], state_dict: dict[str, torch.Tensor],
                dtype: torch.dtype = torch.float32, fuse: bool = True, device: str | torch.device = "cpu",
                blocks: bool = True) -> nn.Module:
    """Instantiate the architecture named by an HF config and load its weights.

    fuse: lay the weights out for inference after loading: projections that read the same input
    (q/k/v, gate/up) become one matrix product, and matrices take their decoding layout
    (nextok.models.linear) where the model will run on the CPU (`device`).
    blocks: let bfloat16 layers keep a quantized checkpoint's block format (False where the
    weights are about to be requantized anyway, as for int8).
    state_dict may hold weights still in a checkpoint's blocks (gguf_blocks.QuantizedWeight, from
    load_checkpoint(..., blocks=True)): linear layers keep them so and pack them where the CPU kernels
    run `dtype`; everything else dequantizes them.
    """
    arch = architecture_of(config)
    model_cls, config_cls = arch.model, arch.config
    with torch.device("meta"):
        model = model_cls(config_cls.from_hf(config))
    if arch.name == "Gemma3ForConditionalGeneration":
        state_dict = language_model_weights(state_dict)
    # Where the layout reads block formats from float32 values, the weights stay float32 until then.
    layout = fuse and torch.device(device).type == "cpu"
    source = torch.float32 if layout and blocks and reads_float32(dtype) else dtype
    kept = quantized_layers(model, state_dict) if layout and blocks and keeps_blocks(dtype) else {}
    if kept and model.config.tie_word_embeddings:  # the head packs the embedding's blocks
        embedding = state_dict.get(_embedding_key(model))
        if embedding is not None and not isinstance(embedding, torch.Tensor):
            kept["lm_head"] = embedding
    weights = {k: _tensor(v, k, kept).to(source) for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIXES)}
    expected = set(model.state_dict())
    if model.config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    missing, unexpected = expected - set(weights), set(weights) - expected
    if model.config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit {model_cls.__name__}: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(weights, strict=False, assign=True)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = _embedding(model).weight
    keep_quantized(model, kept, dtype)
    if isinstance(model, LlamaForCausalLM):  # the rotary frequencies are not in the checkpoint: build them
        model.model.rotary_emb = RotaryEmbedding(rope_inv_freq(model.config))
    model.eval().requires_grad_(False)
    if fuse and hasattr(model, "fuse"):
        model.fuse()
    if layout:
        layout_linears(model, dtype)
    if source != dtype:
        _cast_parameters(model, dtype)
    return model


def _cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Every floating-point parameter to `dtype`, in place; a tied parameter stays one tensor."""
    cast: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_floating_point() and param.dtype != dtype:
                if id(param) not in cast:
                    cast[id(param)] = nn.Parameter(param.detach().to(dtype), requires_grad=False)
                setattr(module, name, cast[id(param)])


def _tensor(value: Any, key: str, kept: dict[str, Any]) -> torch.Tensor:
    """A state-dict entry as a tensor: a meta placeholder where a layer keeps its blocks, else dense."""
    if isinstance(value, torch.Tensor):
        return value
    return torch.empty(value.shape, device="meta") if key.removesuffix(".weight") in kept else value.dequantize()


def _embedding_key(model: nn.Module) -> str:
    embedding = _embedding(model)
    return next(name for name, module in model.named_modules() if module is embedding) + ".weight"


def _embedding(model: nn.Module) -> nn.Embedding:
    return model.transformer.wte if isinstance(model, GPT2LMHeadModel) else model.model.embed_tokens


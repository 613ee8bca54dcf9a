"""Which model class serves which checkpoint architecture, and building one from a state dict."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from nextok.models.attention import AttentionMetadata, LayerKV
from nextok.models.gpt2 import GPT2Config, GPT2LMHeadModel
from nextok.models.linear import layout_linears, reads_float32
from nextok.models.llama import LlamaConfig, LlamaForCausalLM, RotaryEmbedding


class CausalLM(Protocol):
    """What the engine needs of a model."""

    kv_shape: tuple[int, int, int]  # (layers, kv heads, head dim)
    max_positions: int

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[LayerKV] | None = None, attn_meta: AttentionMetadata | None = None) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


ARCHITECTURES: dict[str, tuple[type[nn.Module], Any]] = {
    "GPT2LMHeadModel": (GPT2LMHeadModel, GPT2Config),
    "LlamaForCausalLM": (LlamaForCausalLM, LlamaConfig),
    "MistralForCausalLM": (LlamaForCausalLM, LlamaConfig),
    "Qwen2ForCausalLM": (LlamaForCausalLM, LlamaConfig),
}
MODEL_TYPES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM"}

# Checkpoint entries that are buffers, not weights (old GPT-2 files carry the causal mask).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def architecture_of(config: dict[str, Any]) -> str:
    for arch in config.get("architectures") or []:
        if arch in ARCHITECTURES:
            return arch
    if config.get("model_type") in MODEL_TYPES:
        return MODEL_TYPES[config["model_type"]]
    named = config.get("architectures") or config.get("model_type")
    raise ValueError(f"unsupported architecture {named!r}; supported: {', '.join(ARCHITECTURES)}")


def build_model(config: dict[str, Any], state_dict: dict[str, torch.Tensor],
                dtype: torch.dtype = torch.float32, fuse: bool = True, device: str | torch.device = "cpu",
                blocks: bool = True) -> nn.Module:
    """Instantiate the architecture named by an HF config and load its weights.

    fuse: lay the weights out for inference after loading: projections that read the same input
    (q/k/v, gate/up) become one matrix product, and matrices take their decoding layout
    (nextok.models.linear) where the model will run on the CPU (`device`).
    blocks: let bfloat16 layers keep a quantized checkpoint's block format (False where the
    weights are about to be requantized anyway, as for int8).
    """
    model_cls, config_cls = ARCHITECTURES[architecture_of(config)]
    if config.get("sliding_window") and config.get("use_sliding_window", True) and config.get("model_type") == "mistral":
        window = config["sliding_window"]
        if window < config.get("max_position_embeddings", 0):
            raise ValueError(f"Mistral sliding_window={window} is not supported (contexts are full attention)")
    with torch.device("meta"):
        model = model_cls(config_cls.from_hf(config))
    # Where the layout reads block formats from float32 values, the weights stay float32 until then.
    layout = fuse and torch.device(device).type == "cpu"
    source = torch.float32 if layout and blocks and reads_float32(dtype) else dtype
    weights = {k: v.to(source) for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIXES)}
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
    if isinstance(model, LlamaForCausalLM):  # the rotary frequencies are not in the checkpoint: build them
        model.model.rotary_emb = RotaryEmbedding(model.config)
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


def _embedding(model: nn.Module) -> nn.Embedding:
    return model.transformer.wte if isinstance(model, GPT2LMHeadModel) else model.model.embed_tokens


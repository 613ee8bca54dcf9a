"""Build matching random-weight reference (transformers) and nextok models."""

from __future__ import annotations

import torch
import transformers

from nextok.models.registry import build_model


def llama_pair(seed: int = 0, **config):
    torch.manual_seed(seed)
    defaults = dict(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
    defaults.update(config)
    cls = transformers.Qwen2ForCausalLM if defaults.pop("qwen2", False) else transformers.LlamaForCausalLM
    cfg_cls = transformers.Qwen2Config if cls is transformers.Qwen2ForCausalLM else transformers.LlamaConfig
    ref = cls(cfg_cls(**defaults)).eval()
    _randomize_biases(ref)
    return ref, build_model(ref.config.to_dict(), ref.state_dict())


def gpt2_pair(seed: int = 0, **config):
    torch.manual_seed(seed)
    defaults = dict(vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
    defaults.update(config)
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(**defaults)).eval()
    _randomize_biases(ref)
    return ref, build_model(ref.config.to_dict(), ref.state_dict())


def _randomize_biases(model: torch.nn.Module) -> None:
    """transformers initialises biases to zero; random ones make the bias paths count in parity."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)

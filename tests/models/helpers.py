"""Build matching random-weight reference (transformers) and nextok models."""

from __future__ import annotations

import copy

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


# Tiny configs of the newer architectures: name -> (transformers model class, config class, config overrides).
# Windows are small so that the tests' contexts run past them.
ARCH_CONFIGS = {
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(head_dim=24)),
    "qwen3-sliding": ("Qwen3ForCausalLM", "Qwen3Config", dict(head_dim=16, use_sliding_window=True, sliding_window=5,
                                                                max_window_layers=1)),
    "mistral-sliding": ("MistralForCausalLM", "MistralConfig", dict(sliding_window=6)),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(num_key_value_heads=4)),
    "phi3-sliding": ("Phi3ForCausalLM", "Phi3Config", dict(sliding_window=7)),
}


def arch_pair(name: str, seed: int = 0, **config):
    """A random transformers model of ARCH_CONFIGS[name] (norm weights random too) and nextok's build of it."""
    torch.manual_seed(seed)
    model_cls, config_cls, overrides = ARCH_CONFIGS[name]
    defaults = dict(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
    defaults.update(copy.deepcopy(overrides), **config)  # transformers may fill in nested rope dicts
    ref = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**defaults)).eval()
    _randomize_norms(ref)
    return ref, build_model(ref.config.to_dict(), ref.state_dict())


def _randomize_norms(model: torch.nn.Module) -> None:
    """Norm weights start as ones (or zeros where the norm scales by 1 + weight): random ones make them count."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)


# Gemma: larger weights, so that the logits reach the soft-caps; Gemma 3: 1 full-attention layer in 3, and
# its own rope for each kind (linear scaling on the full-attention layers).
GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
               "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}}
ARCH_CONFIGS |= {
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=5,
                                                          num_hidden_layers=3, attn_logit_softcapping=2.0,
                                                          final_logit_softcapping=20.0, initializer_range=0.2)),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(head_dim=16, query_pre_attn_scalar=20, sliding_window=6,
                                                              num_hidden_layers=4, sliding_window_pattern=3,
                                                              initializer_range=0.2, rope_parameters=GEMMA3_ROPE)),
}

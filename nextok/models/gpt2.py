"""GPT-2: learned positions, LayerNorm, gelu_new, Conv1D weights (in, out), tied head."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nextok.kernels import ops
from nextok.models.attention import AttentionMetadata, LayerKV, attend


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> GPT2Config:
        act = cfg.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"GPT-2 activation_function {act!r} is not supported; supported: 'gelu_new'")
        names = [f for f in cls.__dataclass_fields__ if f in cfg]
        return cls(**{name: cfg[name] for name in names})


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GELU, written as GPT-2's checkpoint was trained with it."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class Conv1D(nn.Module):
    """A linear layer whose weight is stored (in_features, out_features), as GPT-2 checkpoints do."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight)


class GPT2Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.c_attn = Conv1D(config.n_embd, 3 * config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)
        self.scale = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1

    def forward(self, x, kv: LayerKV | None, meta: AttentionMetadata | None) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.c_attn(x).view(n, 3, self.n_head, self.head_dim).unbind(1)  # (N, H, D) each
        return self.c_proj(attend(q, k, v, kv, meta, self.scale))


class GPT2MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = Conv1D(config.n_embd, inner)
        self.c_proj = Conv1D(inner, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(gelu_new(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, x, kv, meta) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv, meta)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


class GPT2LMHeadModel(nn.Module):
    """forward(input_ids, positions, kv_caches, attn_meta) -> hidden; compute_logits(hidden) -> logits."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        c = self.config
        return c.n_layer, c.n_head, c.head_dim

    @property
    def max_positions(self) -> int:
        return self.config.n_positions

    def forward(
        self,
        input_ids: torch.Tensor,  # (N,)
        positions: torch.Tensor,  # (N,)
        kv_caches: list[LayerKV] | None = None,
        attn_meta: AttentionMetadata | None = None,
    ) -> torch.Tensor:  # (N, n_embd)
        t = self.transformer
        x = t.wte(input_ids) + t.wpe(positions)
        for i, block in enumerate(t.h):
            x = block(x, kv_caches[i] if kv_caches else None, attn_meta)
        return t.ln_f(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # (N, n_embd) -> (N, vocab) float32
        return ops.to_float32(self.lm_head(hidden))

    def fuse(self) -> GPT2LMHeadModel:
        """For inference: every Conv1D becomes the nn.Linear of the same product (its weight transposed),
        which the CPU layout then packs for nextok's kernels; the checkpoint names stay."""
        for module in list(self.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, Conv1D):
                    n_in, n_out = child.weight.shape
                    linear = nn.Linear(n_in, n_out, device="meta")
                    linear.weight = nn.Parameter(child.weight.detach().t().contiguous(), requires_grad=False)
                    linear.bias = nn.Parameter(child.bias.detach(), requires_grad=False)
                    setattr(module, name, linear)
        return self

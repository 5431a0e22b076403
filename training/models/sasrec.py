"""A causal Transformer user encoder of the SASRec kind (Kang & McAuley, 2018).

Differences from the paper, each for a reason:
- positions count back from the most recent event, so a left-padded history of any
  length L <= max_len gives the same embedding for its last event (the one we serve);
- embedded log-bucketed time intervals are added to the input (TiSASRec-style signal
  at a fraction of the cost);
- attention uses ``scaled_dot_product_attention`` with an explicit causal + padding mask
  built from the input's shape, so the ONNX export keeps the sequence length dynamic;
- pre-LayerNorm blocks train stably without warm-up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training.errors import ConfigError
from training.models.base import UserEncoder, init_weights, time_embedding


@dataclass
class SASRecConfig:
    n_items: int
    max_len: int = 50
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 2
    dropout: float = 0.2
    n_time_buckets: int = 32
    use_time: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        if dim % n_heads:
            raise ConfigError(f"dim {dim} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        q, k, v = self.qkv(x).split(dim, dim=-1)  # (b, L, d) each
        heads = lambda t: t.view(b, length, self.n_heads, dim // self.n_heads).transpose(1, 2)  # noqa: E731
        # No dropout on the attention weights: on CPU it costs more than the attention itself
        # (a Bernoulli draw per (b, h, L, L) entry; measurements belong in
        # docs/BENCHMARKS.md); embedding and residual dropout remain.
        y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, length, dim))


class Block(nn.Module):
    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.dim)
        self.attn = CausalSelfAttention(config.dim, config.n_heads)
        self.ln2 = nn.LayerNorm(config.dim)
        self.ffn = nn.Sequential(
            nn.Linear(config.dim, 4 * config.dim),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(4 * config.dim, config.dim),
        )
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), mask))
        return x + self.drop(self.ffn(self.ln2(x)))


class SASRec(UserEncoder):
    """Causal self-attention over the history; item embeddings are shared with the output."""

    def __init__(self, config: SASRecConfig):
        super().__init__(config)
        self.position_embedding = nn.Embedding(config.max_len, config.dim)
        self.time_embedding = time_embedding(config)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.dim)
        self.apply(init_weights)

    def hidden_states(self, item_ids: torch.Tensor, time_deltas: torch.Tensor) -> torch.Tensor:
        length = item_ids.shape[1]
        valid = item_ids > 0  # (b, L)
        x = self.add_time_embedding(self.items_at_recency(item_ids), item_ids, time_deltas)
        x = self.drop(x) * valid[..., None]  # (b, L, d)
        causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=x.device))
        eye = torch.eye(length, dtype=torch.bool, device=x.device)
        # A query sees earlier real items; itself always, so all-padding rows stay finite.
        mask = ((causal[None] & valid[:, None, :]) | eye[None])[:, None]  # (b, 1, L, L)
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_f(x)

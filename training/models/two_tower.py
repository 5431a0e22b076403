"""A two-tower model whose user tower reads only the behaviour history (SimpleX-style).

Build it with ``build_encoder("two_tower", n_items, ...)`` or train it with
``python -m training train --data synthetic --model two_tower --loss ccl --out runs/tt``.

The item tower is the item embedding table (``item_embedding``, what retrieval scores
against). The user tower follows SimpleX (Mao et al., CIKM'21) without its user-id
embedding, so it serves users never seen in training:

    long_t  = mean of h_1..h_t                  (the whole history up to t)
    short_t = mean of h_{t-r+1}..h_t             (the ``recent`` last items)
    g_t     = sigmoid(W_g [long_t; short_t] + b_g)   (per dimension)
    u_t     = LayerNorm(W_o (g_t * long_t + (1 - g_t) * short_t) + b_o)

where h_i is the embedding of event i's item (from a separate history table by default,
see ``TwoTower``) plus the embedding of its log-bucketed time interval (as in
``sasrec.py``), so the pooled vectors also carry the rhythm of the history. Both means
are causal and cumulative (prefix sums), so every position has a state and only reads
itself and earlier events; padding contributes exact zeros to the sums and nothing to the
counts, so extra left padding changes no state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training.errors import ConfigError
from training.models.base import UserEncoder, init_weights, time_embedding


@dataclass
class TwoTowerConfig:
    n_items: int
    max_len: int = 50
    dim: int = 64
    recent: int = 3  # items in the short-term mean
    separate_history: bool = True  # history items get their own table (see TwoTower)
    dropout: float = 0.2
    n_time_buckets: int = 32
    use_time: bool = True


class TwoTower(UserEncoder):
    """Gated long- and short-term means of the history, then a linear projection."""

    def __init__(self, config: TwoTowerConfig):
        if config.recent < 1:
            raise ConfigError(f"recent must be at least 1, not {config.recent}")
        super().__init__(config)
        # SimpleX pools the same vectors it scores. For next-item prediction that makes the
        # last item's own vector the best match, a pull towards repeats that a linear map
        # cannot undo; a separate history table lets "after i" differ from "is i", and
        # training loss falls faster with it (measurements belong in docs/BENCHMARKS.md).
        # It doubles the item parameters, hence the option to share them for huge
        # catalogues.
        self.history_embedding = (
            nn.Embedding(config.n_items + 1, config.dim, padding_idx=0)
            if config.separate_history
            else self.item_embedding
        )
        self.time_embedding = time_embedding(config)
        self.drop = nn.Dropout(config.dropout)
        self.gate = nn.Linear(2 * config.dim, config.dim)
        self.project = nn.Linear(config.dim, config.dim)
        # Pooled embeddings start tiny (N(0, 0.02)); normalising gives dot-product losses
        # logits of a useful scale from the first step, as SASRec's final LayerNorm does.
        self.ln_f = nn.LayerNorm(config.dim)
        self.apply(init_weights)
        # Start from the identity: the first states are the pooled history itself.
        nn.init.eye_(self.project.weight)

    def hidden_states(self, item_ids: torch.Tensor, time_deltas: torch.Tensor) -> torch.Tensor:
        valid = (item_ids > 0).unsqueeze(-1).to(self.item_embedding.weight.dtype)  # (b, L, 1)
        h = self.add_time_embedding(self.history_embedding(item_ids), item_ids, time_deltas)
        h = self.drop(h) * valid  # (b, L, d)
        sums = torch.cumsum(h, dim=1)  # (b, L, d)
        counts = torch.cumsum(valid, dim=1)  # (b, L, 1)
        long = sums / counts.clamp(min=1.0)  # (b, L, d)
        # The sum of the last r items is sums_t - sums_{t-r}; shifting right by r with zeros
        # gives sums_{t-r} (0 before the start) for any L, without Python control flow.
        r = self.config.recent
        length = item_ids.shape[1]
        earlier = F.pad(sums, (0, 0, r, 0))[:, :length]  # (b, L, d)
        earlier_counts = F.pad(counts, (0, 0, r, 0))[:, :length]  # (b, L, 1)
        short = (sums - earlier) / (counts - earlier_counts).clamp(min=1.0)  # (b, L, d)
        g = torch.sigmoid(self.gate(torch.cat([long, short], dim=-1)))  # (b, L, d)
        return self.ln_f(self.project(g * long + (1.0 - g) * short))  # (b, L, d)

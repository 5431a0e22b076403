"""A user encoder of the HSTU kind (Zhai et al., "Actions Speak Louder than Words", ICML 2024).

Build it with ``build_encoder("hstu", n_items, ...)`` or train it with
``python -m training train --data synthetic --model hstu --out runs/hstu``.

Each layer is the paper's Hierarchical Sequential Transduction Unit::

    U, V, Q, K = split(SiLU(f1(LayerNorm(X))))
    A = SiLU(Q K^T + rab(p, t)) / max_len        (causal, padding keys masked)
    Y = X + f2(Dropout(LayerNorm(A V) * U))

Attention is pointwise: no softmax, so how much a history holds is not normalised away,
and the SiLU gates every pair on its own. ``rab`` is a relative attention bias, one scalar
per layer for each distance ``i - j`` in the window and one for each log2 bucket of the time
between the two events, ``|t_i - t_j|`` (``base.log2_buckets``), shared by the heads as in
the public reference (facebookresearch/generative-recommenders).

Differences from the paper and the reference, each for a reason:
- the event times come from the inputs every encoder takes (``time_deltas``: seconds since
  the previous event, as the service sends them): their cumulative sum within the window
  gives each event's time up to a constant that cancels in ``t_i - t_j``, so serving needs
  no new input. The sum and the differences run in float64 inside the graph (a window of
  200 events spans up to years, beyond float32's whole seconds), and ``log2_buckets``
  settles each floor exactly, so a bucket boundary falls on the same side in onnxruntime
  as in PyTorch;
- the query's time is its own event's, not the next event's as in the reference's
  training (there the next action's time is known when training and the last position
  uses its own): training then sees what serving sees at every position;
- ``A`` is divided by ``max_len`` (the reference's padded length) rather than by the
  length of the batch, so a history's embedding does not depend on how much left padding
  its batch added;
- positions are also embedded counted back from the most recent event, as in
  ``sasrec.py`` (the reference adds learned absolute positions too), and a final
  LayerNorm replaces the reference's L2 normalisation: states are scored by dot product
  against the item table like the other encoders'; ``use_time`` off drops the time bias
  (time then enters nowhere).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training.errors import ConfigError
from training.models.base import UserEncoder, init_weights, log2_buckets
from training.models.sasrec import SASRecConfig


@dataclass
class HSTUConfig(SASRecConfig):
    """The SASRec-kind's settings, so that the two are swapped with one flag: the time
    buckets bucket the gap between each pair of events here, not each event's gap to the
    one before."""


class HSTULayer(nn.Module):
    """One HSTU block: gated pointwise attention with a relative position and time bias."""

    def __init__(self, config: HSTUConfig):
        super().__init__()
        if config.dim % config.n_heads:
            raise ConfigError(f"dim {config.dim} is not divisible by n_heads {config.n_heads}")
        self.n_heads = config.n_heads
        self.max_len = config.max_len
        self.norm = nn.LayerNorm(config.dim)
        self.uvqk = nn.Linear(config.dim, 4 * config.dim)
        self.attn_norm = nn.LayerNorm(config.dim)
        self.out = nn.Linear(config.dim, config.dim)
        self.drop = nn.Dropout(config.dropout)
        self.position_bias = nn.Embedding(config.max_len, 1)  # by distance i - j
        self.time_bias = nn.Embedding(config.n_time_buckets, 1) if config.use_time else None

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        distance: torch.Tensor,
        time_bucket: torch.Tensor | None,
    ) -> torch.Tensor:
        """``x`` (b, L, d); ``mask`` (b, L, L) 1.0 where query i may read key j;
        ``distance`` (L, L) and ``time_bucket`` (b, L, L) index the biases."""
        b, length, dim = x.shape
        u, v, q, k = F.silu(self.uvqk(self.norm(x))).split(dim, dim=-1)  # (b, L, d) each
        heads = lambda t: t.view(b, length, self.n_heads, dim // self.n_heads).transpose(1, 2)  # noqa: E731
        bias = self.position_bias(distance).squeeze(-1)[None]  # (1, L, L)
        if self.time_bias is not None:
            bias = bias + self.time_bias(time_bucket).squeeze(-1)  # (b, L, L)
        scores = heads(q) @ heads(k).transpose(-1, -2) + bias[:, None]  # (b, h, L, L)
        weights = F.silu(scores) * mask[:, None] / self.max_len
        y = (weights @ heads(v)).transpose(1, 2).reshape(b, length, dim)  # (b, L, d)
        return x + self.out(self.drop(self.attn_norm(y) * u))


def pair_time_buckets(time_deltas: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """(b, L, L) log2 buckets of ``|t_i - t_j|`` from left-padded gaps to the previous event
    (padding gaps must be 0, as ``left_padded_window`` makes them)."""
    times = torch.cumsum(time_deltas.to(torch.float64), dim=1)  # (b, L), up to a constant
    # Exact in float64; bucketed in float32, which halves the cost of the (b, L, L) work
    # and is exact up to 2**24 s (194 days) and deterministic beyond in both runtimes.
    gaps = torch.abs(times[:, :, None] - times[:, None, :]).to(torch.float32)
    return log2_buckets(gaps, n_buckets)


class HSTU(UserEncoder):
    """Stacked HSTU layers over the history; item embeddings are shared with the output."""

    def __init__(self, config: HSTUConfig):
        super().__init__(config)
        self.position_embedding = nn.Embedding(config.max_len, config.dim)
        self.time_embedding = None  # time enters through the layers' relative bias
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(HSTULayer(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.dim)
        self.apply(init_weights)

    def hidden_states(self, item_ids: torch.Tensor, time_deltas: torch.Tensor) -> torch.Tensor:
        length = item_ids.shape[1]
        valid = item_ids > 0  # (b, L)
        x = self.drop(self.items_at_recency(item_ids)) * valid[..., None]  # (b, L, d)
        steps = torch.arange(length, device=item_ids.device)
        distance = torch.clamp(steps[:, None] - steps[None, :], min=0, max=self.max_len - 1)
        causal = steps[:, None] >= steps[None, :]  # (L, L), a query reads itself
        mask = (causal[None] & valid[:, None, :]).to(x.dtype)  # (b, L, L)
        time_bucket = None
        if self.config.use_time:
            time_bucket = pair_time_buckets(time_deltas, self.config.n_time_buckets)
        for layer in self.layers:
            x = layer(x, mask, distance, time_bucket)
        return self.ln_f(x)

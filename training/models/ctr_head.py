"""The CTR head that reranks retrieved candidates: a DCN-v2 over user x candidate pairs.

Train it with ``training.ctr.train_ctr_head``; ``InferenceHead`` is the graph that is
exported to ``ctr_head.onnx`` and served by ``service.ranking.CtrHead``.

A DCN-v2 (full-rank cross layers) beside a deep MLP, over a narrow, factorised projection
of user, item and their product: small, explicit feature crosses (user x item interaction
against popularity, recency, retrieval score) at about 11k multiply-adds per candidate
with the defaults, so that reranking 200 candidates stays a small share of a request.
With a second label (MovieLens: rating >= 4, "liked", beside "watched next") it has one
output tower per task; the served logit is the first task's, "watched".

Shapes: b users (requests), c candidates each, d the embedding width, f candidate
features, h the interaction width, w = h + f the width the crosses work on, t tasks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn


@dataclass
class CtrHeadConfig:
    """Everything needed to rebuild a head (stored in the bundle manifest)."""

    dim: int  # d, of the retriever's user and item embeddings
    feature_names: list[str]  # f candidate features, in the order the service builds them
    tasks: list[str] = field(default_factory=lambda: ["watched"])
    interaction: int = 32  # h, width of the user x candidate projection the head starts from
    cross_layers: int = 2
    deep: tuple[int, ...] = (64, 32)
    tower: int = 16  # hidden width of each task's tower
    dropout: float = 0.1

    @property
    def n_features(self) -> int:
        return len(self.feature_names)


class TaskTower(nn.Module):
    """One task's output: a linear term (a wide skip) plus a one-hidden-layer MLP."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.linear = nn.Linear(width, 1)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x) + self.mlp(x)  # (..., 1)


class CtrHeadModel(nn.Module):
    """DCN-v2 (full-rank cross layers) beside a deep MLP, one small tower per task, over a
    narrow projection of the user x candidate interaction.

    e = P [u, v, u * v] + p, evaluated as (P_v + P_uv diag(u)) v + (P_u u + p): the matrix in
    brackets is built once per request, so a candidate costs one (d x h) product instead of
    a (3d x h) one, and the crosses then work on h + f columns instead of 3d + f (about a
    tenth of the multiply-adds of crossing the raw embeddings; the serving rerank is
    dominated by them). x0 = [LayerNorm(e), standardised features]; cross: x_{l+1} = x0 *
    (W x_l + b) + x_l; deep: MLP(x0); each task: linear + MLP of [x_L, deep] -> one logit.
    """

    def __init__(self, config: CtrHeadConfig):
        super().__init__()
        self.config = config
        d, f, h = config.dim, config.n_features, config.interaction
        width = h + f
        self.register_buffer("feature_mean", torch.zeros(f))
        self.register_buffer("feature_std", torch.ones(f))
        self.interaction = nn.Linear(3 * d, h)
        self.interaction_norm = nn.LayerNorm(h)
        self.cross = nn.ModuleList(nn.Linear(width, width) for _ in range(config.cross_layers))
        layers: list[nn.Module] = []
        previous = width
        for size in config.deep:
            layers += [nn.Linear(previous, size), nn.ReLU(), nn.Dropout(config.dropout)]
            previous = size
        self.deep = nn.Sequential(*layers)
        self.towers = nn.ModuleList(TaskTower(width + previous, config.tower) for _ in config.tasks)

    def set_feature_stats(self, mean: np.ndarray, std: np.ndarray) -> None:
        """The training features' mean and standard deviation (f,), to standardise with."""
        with torch.no_grad():
            self.feature_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
            self.feature_std.copy_(torch.as_tensor(np.maximum(std, 1e-6), dtype=torch.float32))

    def set_base_rates(self, rates: Sequence[float]) -> None:
        """Start each task at its positive rate, so that training spends its first steps on
        ranking rather than on the bias (one positive in hundreds of candidates)."""
        with torch.no_grad():
            for tower, rate in zip(self.towers, rates, strict=True):
                rate = min(max(float(rate), 1e-6), 1 - 1e-6)
                tower.linear.bias.fill_(math.log(rate / (1 - rate)))

    def interact(self, user: Tensor, candidates: Tensor) -> Tensor:
        """e = P [u, v, u * v] + p for every candidate (b, c, h), factorised per user.

        ``user`` (b, d), ``candidates`` (b, c, d).
        """
        on_user, on_item, on_product = self.interaction.weight.split(self.config.dim, dim=1)
        per_user = on_item + on_product * user[:, None, :]  # (b, h, d)
        offset = user @ on_user.T + self.interaction.bias  # (b, h)
        return candidates @ per_user.transpose(1, 2) + offset[:, None, :]  # (b, c, h)

    def represent(self, user: Tensor, candidates: Tensor, features: Tensor) -> Tensor:
        """What the task towers read, one row per candidate: (b * c, w + deep[-1]).

        ``user`` (b, d), ``candidates`` (b, c, d), ``features`` (b, c, f). Rows are flattened
        before the layers so that each one exports as a single Gemm with its bias
        (onnxruntime left every 3-d Linear as a MatMul plus a broadcast Add, which took
        longer than the MatMul).
        """
        pairs = self.interaction_norm(self.interact(user, candidates))  # (b, c, h)
        scalars = (features - self.feature_mean) / self.feature_std  # (b, c, f)
        x0 = torch.cat([pairs, scalars], dim=-1).flatten(0, 1)  # (b * c, w)
        x = x0
        for layer in self.cross:
            x = x0 * layer(x) + x  # (b * c, w)
        return torch.cat([x, self.deep(x0)], dim=-1)  # (b * c, w + deep[-1])

    def forward(self, user: Tensor, candidates: Tensor, features: Tensor) -> Tensor:
        """Logits (b, c, t) of every task."""
        joined = self.represent(user, candidates, features)
        logits = torch.cat([tower(joined) for tower in self.towers], dim=-1)  # (b * c, t)
        return logits.unflatten(0, features.shape[:2])  # (b, c, t)


class InferenceHead(nn.Module):
    """The serving graph: the first task's logits (b, c), without the other task towers;
    eval mode, nothing else. Its argument names are the ONNX graph's input names."""

    def __init__(self, head: CtrHeadModel):
        super().__init__()
        self.head = head
        self.eval()

    def forward(
        self,
        user_embedding: Tensor,  # (b, d)
        candidate_embeddings: Tensor,  # (b, c, d)
        candidate_features: Tensor,  # (b, c, f)
    ) -> Tensor:
        joined = self.head.represent(user_embedding, candidate_embeddings, candidate_features)
        return self.head.towers[0](joined).reshape(candidate_features.shape[:2])  # (b, c)

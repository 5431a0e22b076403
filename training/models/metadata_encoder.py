"""The item-metadata encoder: an item's metadata tokens in, a vector in a retriever's item
space out (cold start for items the retriever never saw).

The inputs are what ``service.item_metadata.MetadataVocabulary.featurize`` makes: token ids
and weights (each field's weights sum to one). The weighted sum of the token embeddings is
a bag of fields; a residual MLP then lets fields interact (a genre means something else in
the 1950s than in the 1990s) before a linear map into the item space. Trained by
``training.cold_start``; exported whole, as it is, by ``training.onnx_export``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from training.models.base import init_weights


@dataclass
class MetadataEncoderConfig:
    n_tokens: int  # vocabulary size, padding id 0 included
    dim: int  # the retriever's item vector width
    hidden: int  # the token embeddings' and the MLP's width
    dropout: float
    # The fitted items' mean vector length: the layers work in units of it, so a small
    # initialisation need not grow to the item space's scale, whatever that is.
    scale: float = 1.0


class MetadataEncoderModel(nn.Module):
    """Bag of weighted token embeddings -> residual MLP -> item vector."""

    def __init__(self, config: MetadataEncoderConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.n_tokens, config.hidden, padding_idx=0)
        self.mlp = nn.Sequential(
            nn.LayerNorm(config.hidden),
            nn.Linear(config.hidden, config.hidden),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, config.hidden),
        )
        self.out = nn.Linear(config.hidden, config.dim)
        self.register_buffer("scale", torch.tensor(float(config.scale)))
        self.apply(init_weights)

    def forward(self, token_ids: torch.Tensor, token_weights: torch.Tensor) -> torch.Tensor:
        bag = (self.token_embedding(token_ids) * token_weights[..., None]).sum(dim=1)  # (b, h)
        return self.out(bag + self.mlp(bag)) * self.scale  # (b, dim)

"""A dilated causal CNN user encoder of the NextItNet kind (Yuan et al., WSDM 2019).

Build it with ``build_encoder("nextitnet", n_items, ...)`` or train it with
``python -m training train --data synthetic --model nextitnet --out runs/nextitnet``.

Each residual block is the paper's block (b): two causal convolutions of kernel 3, each
followed by LayerNorm and ReLU, with the block input added back. ``dilations`` gives the
dilation of every convolution, consecutive pairs forming one block, and the whole list is
repeated ``n_stacks`` times; the receptive field is ``1 + (kernel_size - 1) * n_stacks *
sum(dilations)`` positions (61 with the defaults, enough for ``max_len`` 50; raise
``n_stacks`` for longer histories).

Differences from the paper, each for a reason:
- padded positions are zeroed before every convolution, so a real position reads exactly
  the zeros that causal left padding of the convolution would give: its state does not
  depend on how much padding the batch added;
- embedded log-bucketed time intervals are added to the input, as in ``sasrec.py``;
- no positional embedding: each kernel tap has its own weights, so the convolutions
  already know how far back an item is, and an absolute position would only tell how
  long the (truncated) history is;
- a final LayerNorm, because the residual stream is never normalised and the output is
  scored by dot product against the item table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training.errors import ConfigError
from training.models.base import UserEncoder, init_weights, time_embedding


@dataclass
class NextItNetConfig:
    n_items: int
    max_len: int = 50
    dim: int = 64
    dilations: tuple[int, ...] = (1, 2, 4, 8)  # one per convolution; pairs form a block
    n_stacks: int = 2
    kernel_size: int = 3
    dropout: float = 0.2
    n_time_buckets: int = 32
    use_time: bool = True

    def __post_init__(self) -> None:
        # A config read back from JSON (a report, a manifest) carries a list.
        self.dilations = tuple(self.dilations)
        if not self.dilations or len(self.dilations) % 2:
            raise ConfigError(
                f"dilations {self.dilations} must pair up: each residual block has two"
            )


class CausalConv(nn.Module):
    """A dilated 1-d convolution over (b, L, d) whose output at t reads inputs <= t only."""

    def __init__(self, dim: int, kernel_size: int, dilation: int):
        super().__init__()
        self.left = (kernel_size - 1) * dilation
        self.conv = nn.Conv1d(dim, dim, kernel_size, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x.transpose(1, 2), (self.left, 0))  # (b, d, left + L)
        return self.conv(x).transpose(1, 2)  # (b, L, d)


class ResidualBlock(nn.Module):
    """x + ReLU(LN(conv2(ReLU(LN(conv1(x)))))), with padding zeroed before each conv."""

    def __init__(self, config: NextItNetConfig, dilation1: int, dilation2: int):
        super().__init__()
        self.conv1 = CausalConv(config.dim, config.kernel_size, dilation1)
        self.ln1 = nn.LayerNorm(config.dim)
        self.conv2 = CausalConv(config.dim, config.kernel_size, dilation2)
        self.ln2 = nn.LayerNorm(config.dim)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``x`` (b, L, d) is zero at padding; ``valid`` (b, L, 1) is 1.0 at real items."""
        h = F.relu(self.ln1(self.conv1(x)))  # (b, L, d)
        # LayerNorm's bias makes padding non-zero again; the next conv must read zeros.
        h = F.relu(self.ln2(self.conv2(h * valid)))  # (b, L, d)
        return (x + self.drop(h)) * valid


class NextItNet(UserEncoder):
    """Stacked dilated causal convolutions; item embeddings are shared with the output."""

    def __init__(self, config: NextItNetConfig):
        super().__init__(config)
        self.time_embedding = time_embedding(config)
        self.drop = nn.Dropout(config.dropout)
        pairs = list(zip(config.dilations[::2], config.dilations[1::2], strict=True))
        pairs = pairs * config.n_stacks
        self.blocks = nn.ModuleList(ResidualBlock(config, d1, d2) for d1, d2 in pairs)
        self.ln_f = nn.LayerNorm(config.dim)
        # Same embedding initialisation as SASRec (N(0, 0.02), padding row zero); the
        # convolutions keep PyTorch's default, which suits ReLU.
        self.apply(init_weights)

    def hidden_states(self, item_ids: torch.Tensor, time_deltas: torch.Tensor) -> torch.Tensor:
        valid = (item_ids > 0).unsqueeze(-1).to(self.item_embedding.weight.dtype)  # (b, L, 1)
        x = self.add_time_embedding(self.item_embedding(item_ids), item_ids, time_deltas)
        x = self.drop(x) * valid  # (b, L, d)
        for block in self.blocks:
            x = block(x, valid)
        return self.ln_f(x)

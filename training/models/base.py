"""The interface every user encoder shares, and the time-interval bucketing they all use.

An encoder maps a left-padded history (item ids, seconds since the previous event) to a
user embedding, and item ids to item embeddings; recommendations are inner products
between the two. ``hidden_states`` gives one embedding per position (the prediction of the
next item after each prefix), which is what sequential training needs.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def log2_buckets(gaps: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """Gaps in seconds (negative read as 0) to buckets 1..n_buckets-1: floor(log2(gap + 1))
    + 1, capped; bucket 0 is left for padding.

    Log buckets keep minutes, hours, days and months apart with few parameters; the
    arithmetic stays inside the exported graph so the service passes raw seconds. A float
    log2 gives the floor only to within one: onnxruntime computes it as ln(x) / ln(2) with
    ln(2) rounded to float32, which in float64 puts a whole number of seconds just at a power
    of two one below PyTorch's; comparing with the powers of two on either side (exact in
    any precision) settles it.
    """
    reached = torch.clamp(gaps, min=0.0) + 1.0
    guess = torch.floor(torch.log2(reached))
    low = torch.pow(2.0, guess)
    exponent = guess - (reached < low).to(guess.dtype) + (reached >= 2.0 * low).to(guess.dtype)
    bucket = exponent.to(torch.int64)  # 1 day -> 16, 1 year -> 24
    return torch.clamp(bucket, max=n_buckets - 2) + 1


def time_buckets(time_deltas: torch.Tensor, item_ids: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """Each event's gap to the previous one, log2-bucketed (``log2_buckets``): 0 for
    padding, 1..n_buckets-1 otherwise."""
    bucket = log2_buckets(time_deltas, n_buckets)
    return torch.where(item_ids > 0, bucket, torch.zeros_like(bucket))


def time_embedding(config) -> nn.Embedding | None:
    """The embedding of the time buckets (row 0 for padding), or None when ``config.use_time``
    is off. ``config`` is an encoder's config: ``n_time_buckets``, ``dim``, ``use_time``."""
    if not config.use_time:
        return None
    return nn.Embedding(config.n_time_buckets, config.dim, padding_idx=0)


def init_weights(module: nn.Module) -> None:
    """N(0, 0.02) for linear and embedding weights, zero biases, zero padding rows."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        with torch.no_grad():
            module.weight[module.padding_idx].zero_()


def width_groups(item_ids: torch.Tensor, groups: int) -> list[tuple[torch.Tensor | None, int]]:
    """The rows of a left-padded (b, L) batch in up to ``groups`` groups of equal size by
    width (events that are not padding), narrowest first: (row indices, the group's widest
    row) each. One group, every row at the batch's width (indices None), for ``groups`` 1."""
    if groups <= 1:
        return [(None, item_ids.shape[1])]
    widths = (item_ids > 0).sum(1)
    order = torch.argsort(widths, stable=True)
    # Every group's width in one read: on a GPU each read of a tensor waits for the device.
    ordered = widths[order].tolist()
    cut, end = [], 0
    for rows in torch.tensor_split(order, min(groups, len(order))):
        end += len(rows)
        cut.append((rows, max(ordered[end - 1], 1)))
    return cut


class UserEncoder(nn.Module):
    """Base class: subclasses implement ``hidden_states`` and own ``item_embedding``."""

    config: object  # the encoder's config dataclass
    item_embedding: nn.Embedding
    position_embedding: nn.Embedding  # of sequence encoders: by recency (items_at_recency)
    time_embedding: nn.Embedding | None  # see time_embedding()
    max_len: int
    # Set when the model was trained with a cosine objective: retrieval must then rank
    # against unit-length item vectors, as training scored.
    normalize_items: bool = False

    def __init__(self, config):
        """Keep the config and make the item table every encoder scores against: N + 1 rows,
        row 0 the padding. Subclasses then build their own layers."""
        super().__init__()
        self.config = config
        self.max_len = config.max_len
        self.item_embedding = nn.Embedding(config.n_items + 1, config.dim, padding_idx=0)

    def hidden_states(self, item_ids: torch.Tensor, time_deltas: torch.Tensor) -> torch.Tensor:
        """Per-position user states (b, L, d) for left-padded (b, L) inputs."""
        raise NotImplementedError

    def items_at_recency(self, item_ids: torch.Tensor) -> torch.Tensor:
        """Item embeddings plus ``position_embedding`` of each position counted back from the
        most recent (b, L, d): a left-padded history of any length puts its newest events at
        the same positions, and positions beyond ``max_len`` share the last one."""
        steps = torch.arange(item_ids.shape[1], device=item_ids.device)
        recency = torch.clamp(torch.flip(steps, dims=[0]), max=self.max_len - 1)
        return self.item_embedding(item_ids) + self.position_embedding(recency)[None]

    def add_time_embedding(
        self, x: torch.Tensor, item_ids: torch.Tensor, time_deltas: torch.Tensor
    ) -> torch.Tensor:
        """``x`` (b, L, d) plus each event's time-bucket embedding (``x`` without one)."""
        if self.time_embedding is None:
            return x
        buckets = time_buckets(time_deltas, item_ids, self.config.n_time_buckets)
        return x + self.time_embedding(buckets)

    def states_by_width(
        self, item_ids: torch.Tensor, time_deltas: torch.Tensor, groups: int = 1
    ) -> Iterator[tuple[torch.Tensor | None, int, torch.Tensor]]:
        """``hidden_states`` of left-padded (b, L) inputs read in up to ``groups`` groups of
        rows of similar width (``width_groups``), each cut to its widest row: yields (row
        indices, or None for every row; width; states (rows, width, d)) per group.

        A row's states depend neither on the rows beside it nor on the padding before it
        (positions count back from the newest event; padding is masked or zero), so only
        the work changes: a batch cut to its widest row computes that width for every row,
        which on short, uneven histories is mostly padding."""
        for rows, width in width_groups(item_ids, groups):
            ids = item_ids if rows is None else item_ids[rows]
            deltas = time_deltas if rows is None else time_deltas[rows]
            yield rows, width, self.hidden_states(ids[:, -width:], deltas[:, -width:])

    def last_states(
        self, item_ids: torch.Tensor, time_deltas: torch.Tensor, groups: int = 1
    ) -> torch.Tensor:
        """The newest position's state of each row (b, d), in row order, read in up to
        ``groups`` width groups (``states_by_width``)."""
        parts = list(self.states_by_width(item_ids, time_deltas, groups))
        if parts[0][0] is None:
            return parts[0][2][:, -1]
        rows = torch.cat([group_rows for group_rows, _, _ in parts])
        states = torch.cat([group_states[:, -1] for _, _, group_states in parts])
        return states[torch.argsort(rows.to(states.device))]

    def encode_user(self, item_ids: torch.Tensor, time_deltas: torch.Tensor) -> torch.Tensor:
        """L2-normalised user embeddings (b, d) from the most recent position."""
        return F.normalize(self.hidden_states(item_ids, time_deltas)[:, -1], dim=-1)

    def all_item_embeddings(self) -> torch.Tensor:
        """Item vectors of every id including padding row 0, (N + 1, d), as retrieval uses them."""
        weight = self.item_embedding.weight
        return F.normalize(weight, dim=-1) if self.normalize_items else weight

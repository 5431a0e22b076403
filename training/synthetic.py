"""The embedded default data: a seeded generator of interaction logs with learnable structure.

Run ``python -m training generate --out data/synthetic.parquet`` to write one to disk; the
``synthetic[:users=..,items=..,seed=..]`` data spec (``training.datasets``) generates it in
memory.

What makes it realistic enough to be a meaningful default (and not noise):

- items belong to taste clusters of uneven size, and popularity is long-tailed (Zipf);
- each user has a home cluster (and sometimes a second one);
- items of a cluster form chains (think episodes or sequels): after an item, users often
  move to one of the next few items of its chain, so the order of a history matters;
- gaps between events mix short in-session gaps with long gaps between sessions, and a
  long gap makes a fresh pick from the user's tastes more likely than following the chain,
  so time intervals carry signal.

Generation is vectorised over users and clusters, so the same code builds 1,000,000 items.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from training.data import Interactions, ItemMetadata

LOG = logging.getLogger(__name__)


@dataclass
class SyntheticConfig:
    """Size and shape of a synthetic log; the defaults make the README's fast default."""

    users: int = 5000
    items: int = 2000
    clusters: int = 0  # 0: about one cluster per 100 items
    mean_length: float = 40.0
    min_length: int = 5
    max_length: int = 200
    zipf: float = 1.0
    follow_short_gap: float = 0.85  # chance to follow the chain after a short gap
    follow_long_gap: float = 0.35  # ... after a long gap (a new session)
    short_gap_share: float = 0.7
    noise: float = 0.05  # chance of a globally popular item regardless of taste
    chain_window: int = 4
    seed: int = 0
    start_time: int = 1_600_000_000

    @property
    def n_clusters(self) -> int:
        return self.clusters or max(2, self.items // 100)


def generate(config: SyntheticConfig | None = None) -> Interactions:
    """Generate a log; the same config always gives the same interactions."""
    config = config or SyntheticConfig()
    rng = np.random.default_rng(config.seed)
    n_items, n_clusters = config.items, config.n_clusters

    # Items: uneven cluster sizes, a random chain order inside each cluster, Zipf popularity.
    cluster_share = rng.dirichlet(np.full(n_clusters, 2.0))
    cluster_of = rng.choice(n_clusters, size=n_items, p=cluster_share)
    order = np.lexsort((rng.random(n_items), cluster_of))  # items grouped by cluster
    cluster_sorted = cluster_of[order]
    cluster_start = np.searchsorted(cluster_sorted, np.arange(n_clusters))
    cluster_end = np.searchsorted(cluster_sorted, np.arange(n_clusters), side="right")
    popularity = 1.0 / np.arange(1, n_items + 1) ** config.zipf
    weight_sorted = popularity[rng.permutation(n_items)]  # popularity of order[j]
    cum_weight = np.concatenate([[0.0], np.cumsum(weight_sorted)])

    # Users: a home cluster by cluster mass, and a second taste for a third of them.
    cluster_mass = cum_weight[cluster_end] - cum_weight[cluster_start]
    empty = cluster_end == cluster_start
    mass_p = np.where(empty, 0.0, cluster_mass) / np.where(empty, 0.0, cluster_mass).sum()
    n_users = config.users
    home = rng.choice(n_clusters, size=n_users, p=mass_p)
    second = np.where(rng.random(n_users) < 0.33, rng.choice(n_clusters, n_users, p=mass_p), home)
    lengths = np.clip(
        rng.lognormal(np.log(config.mean_length) - 0.32, 0.8, n_users),
        config.min_length,
        config.max_length,
    ).astype(np.int64)
    # Steps are generated with some headroom: duplicates are removed afterwards.
    steps = int(np.ceil(lengths.max() * 1.3))

    def from_clusters(clusters: np.ndarray) -> np.ndarray:
        lo, hi = cum_weight[cluster_start[clusters]], cum_weight[cluster_end[clusters]]
        draw = lo + rng.random(len(clusters)) * (hi - lo)
        pos = np.searchsorted(cum_weight, draw, side="right") - 1
        return np.clip(pos, cluster_start[clusters], cluster_end[clusters] - 1)

    def global_popular(count: int) -> np.ndarray:
        draw = rng.random(count) * cum_weight[-1]
        return np.clip(np.searchsorted(cum_weight, draw, side="right") - 1, 0, n_items - 1)

    positions = np.empty((n_users, steps), dtype=np.int64)  # index into `order`
    gaps = np.empty((n_users, steps), dtype=np.int64)
    current = from_clusters(home)
    positions[:, 0] = current
    gaps[:, 0] = 0
    for step in range(1, steps):
        short = rng.random(n_users) < config.short_gap_share
        gaps[:, step] = (
            np.where(
                short,
                rng.lognormal(np.log(600), 1.0, n_users),  # minutes within a session
                rng.lognormal(np.log(3 * 86400), 1.2, n_users),  # days between sessions
            ).astype(np.int64)
            + 1
        )
        follow_p = np.where(short, config.follow_short_gap, config.follow_long_gap)
        roll = rng.random(n_users)
        taste = np.where(rng.random(n_users) < 0.7, home, second)
        picked = from_clusters(taste)
        # Chain step: one of the next `chain_window` items of the cluster, nearer more likely.
        offset = np.minimum(rng.geometric(0.55, n_users), config.chain_window)
        cluster = cluster_sorted[current]
        size = cluster_end[cluster] - cluster_start[cluster]
        chained = cluster_start[cluster] + (current - cluster_start[cluster] + offset) % size
        noisy = global_popular(n_users)
        current = np.where(
            roll < follow_p, chained, np.where(roll < 1 - config.noise, picked, noisy)
        )
        positions[:, step] = current

    # Keep the first occurrence of each (user, item) and cut each user to their length.
    user_of = np.repeat(np.arange(n_users), steps)
    item_of = order[positions.ravel()]
    times = (
        config.start_time + rng.integers(0, 365 * 86400, n_users)[:, None] + np.cumsum(gaps, axis=1)
    )
    _, first = np.unique(user_of * n_items + item_of, return_index=True)
    first.sort()
    user_of, item_of, times = user_of[first], item_of[first], times.ravel()[first]
    rank = np.arange(len(user_of)) - np.searchsorted(user_of, user_of)
    keep = rank < lengths[user_of]
    user_of, item_of, times = user_of[keep], item_of[keep], times[keep]

    metadata = ItemMetadata(
        titles={str(i + 1): f"Item {i + 1}" for i in range(n_items)} if n_items <= 100_000 else {},
        genres={str(i + 1): [f"genre-{cluster_of[i]}"] for i in range(n_items)}
        if n_items <= 100_000
        else {},
    )
    LOG.info("synthetic data: %d users, %d items, %d interactions", n_users, n_items, len(user_of))
    return Interactions(
        users=user_of + 1,
        items=item_of + 1,
        timestamps=times.astype(np.int64),
        ratings=None,
        source=f"synthetic:users={n_users},items={n_items},seed={config.seed}",
        metadata=metadata,
    )

"""The items of a bundle: the catalogue the service serves from, and its table.

``items.parquet`` holds one row per internal id 1..N (the padding row 0 is not stored):
``item_id``, ``raw_id``, ``popularity`` (training counts), and when the data has them
``title``, ``genres`` and ``last_seen_ts`` (the item's latest training interaction, which
the CTR head's recency feature needs). :func:`write_items_table` writes it at export,
:func:`read_catalogue` reads it into a :class:`Catalogue` when a bundle is loaded.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from itertools import repeat
from pathlib import Path

import numpy as np

from service.errors import BundleError


@dataclass
class Catalogue:
    """The items of a bundle: raw ids, popularity and optional metadata, by internal id."""

    raw_ids: np.ndarray  # (N + 1,) str, row 0 = ""
    popularity: np.ndarray  # (N + 1,) int64 training counts
    titles: list[str | None] | None = None
    genres: list[list[str]] | None = None
    lookup: dict[str, int] = field(default_factory=dict)
    last_seen: np.ndarray | None = None  # (N + 1,) int64, -1 = never

    @property
    def n_items(self) -> int:
        return len(self.raw_ids) - 1

    def internal_ids(self, raw: list[str]) -> np.ndarray:
        """Internal ids for raw ids; unknown ids map to 0 (padding)."""
        # map() over the dict's own get: faster than a generator for a request's ids.
        return np.array(list(map(self.lookup.get, raw, repeat(0, len(raw)))), dtype=np.int64)

    @cached_property
    def popularity_order(self) -> np.ndarray:
        """Internal ids, most popular first (ties: lower id first), padding excluded."""
        counts = self.popularity.astype(np.float64)
        counts[0] = -np.inf
        return np.argsort(-counts, kind="stable")[:-1]

    @cached_property
    def _folded_titles(self) -> list[str]:
        return [(title or "").casefold() for title in self.titles or ()]

    def search(self, text: str, limit: int) -> tuple[np.ndarray, int]:
        """Up to ``limit`` internal ids for ``text`` and how many matched in all: the item
        whose raw id is ``text``, then items whose title contains it (case-insensitive),
        most popular first; for blank ``text``, the most popular items."""
        text = text.strip()
        if not text:
            return self.popularity_order[:limit], self.n_items
        needle = text.casefold()
        titled = np.fromiter(
            (i for i, title in enumerate(self._folded_titles) if needle in title), np.int64
        )
        titled = titled[np.argsort(-self.popularity[titled], kind="stable")]
        exact = self.lookup.get(text)
        if exact is not None:
            titled = np.concatenate([[exact], titled[titled != exact]])
        return titled[:limit], len(titled)


def read_catalogue(path: Path) -> Catalogue:
    """items.parquet into a Catalogue. The id map must be whole: ids exactly 1..N in order,
    every raw id a distinct non-null string, counts and times without gaps."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise BundleError(f"{path}: not a readable Parquet file ({exc})") from exc
    names = table.column_names
    for required in ("item_id", "raw_id", "popularity"):
        if required not in names:
            raise BundleError(f"{path}: no {required!r} column")
    if table.num_rows == 0:
        raise BundleError(f"{path}: no items")
    for column in ("item_id", "raw_id", "popularity", "last_seen_ts"):
        if column in names and table.column(column).null_count:
            raise BundleError(f"{path}: {column} has {table.column(column).null_count} nulls")
    for column in ("item_id", "popularity", "last_seen_ts"):
        if column in names and not pa.types.is_integer(table.column(column).type):
            raise BundleError(f"{path}: {column} is {table.column(column).type}, not integers")
    if not pa.types.is_string(table.column("raw_id").type) and not pa.types.is_large_string(
        table.column("raw_id").type
    ):
        raise BundleError(f"{path}: raw_id is {table.column('raw_id').type}, not strings")
    ids = table.column("item_id").to_numpy()
    if not np.array_equal(ids, np.arange(1, len(ids) + 1)):
        raise BundleError(f"{path}: item_id must run 1..N in order")
    raw = np.concatenate([[""], np.asarray(table.column("raw_id").to_pylist(), dtype=object)])
    popularity = np.concatenate([[0], table.column("popularity").to_numpy()]).astype(np.int64)
    titles = [None, *table.column("title").to_pylist()] if "title" in names else None
    genres = [[], *table.column("genres").to_pylist()] if "genres" in names else None
    lookup = {r: i for i, r in enumerate(raw.tolist()) if i}
    if len(lookup) != len(ids):
        twice = next(r for r, n in Counter(raw[1:].tolist()).items() if n > 1)
        raise BundleError(f"{path}: raw_id {twice!r} names more than one item")
    last_seen = None
    if "last_seen_ts" in names:
        last_seen = np.concatenate([[-1], table.column("last_seen_ts").to_numpy()])
        last_seen = last_seen.astype(np.int64)
    return Catalogue(raw, popularity, titles, genres, lookup, last_seen)


def write_items_table(
    path: Path,
    raw_ids: list[str],
    popularity: np.ndarray,
    *,
    titles: dict[str, str] | None = None,
    genres: dict[str, list[str]] | None = None,
    last_seen: np.ndarray | None = None,
) -> None:
    """items.parquet: one row per internal id 1..N (padding row 0 is not stored).

    ``last_seen`` (N + 1,) holds each item's latest training interaction (-1: never), which
    the CTR head's recency feature needs at serving time.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = list(raw_ids[1:])
    columns = {
        "item_id": pa.array(np.arange(1, len(raw_ids), dtype=np.int64)),
        "raw_id": pa.array(raw, pa.string()),
        "popularity": pa.array(np.asarray(popularity[1:], dtype=np.int64)),
    }
    if titles:
        columns["title"] = pa.array([titles.get(r) for r in raw], pa.string())
    if genres:
        columns["genres"] = pa.array([genres.get(r, []) for r in raw], pa.list_(pa.string()))
    if last_seen is not None:
        columns["last_seen_ts"] = pa.array(np.asarray(last_seen[1:], dtype=np.int64))
    pq.write_table(pa.table(columns), path)

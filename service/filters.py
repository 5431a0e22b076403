"""Candidate filters: what retrieval found, without what a request must never be served.

Every path that turns retrieved ids into an answer (the online pipeline, the rerank of a
single request, the batch job, the CTR head's training examples, the popularity fallback)
removes padding slots, the request's seen items and what its filter leaves out here, so
they all drop the same items.

A filter (``service.catalogue.ItemFilter``) reaches this module compiled: a mask over
internal ids (``service.catalogue.Eligible``) and the internal ids of the items it
excludes one by one. How many candidates it removed is counted as it removes them, and
:func:`first_depth` says how deep a search must go for enough candidates to survive it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from service.catalogue import Eligible

# A filter deepens the first search at most this many times over; a filter that needs
# more is left to a search of the eligible items themselves (service.pipeline).
FIRST_SEARCH_GROWTH = 4
# Extra depth for chance: standard deviations of the number of candidates that survive.
SURVIVOR_SIGMAS = 3.0


def drop_seen(
    ids: Sequence[np.ndarray],
    scores: Sequence[np.ndarray],
    seen: Sequence[np.ndarray],
    keep: Sequence[int],
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each row's candidates (ids, scores in retrieval order) without padding (id 0) and
    without its ``seen`` ids, the first ``keep`` of them."""
    return drop_excluded(ids, scores, seen, keep)[0]


def drop_excluded(
    ids: Sequence[np.ndarray],
    scores: Sequence[np.ndarray],
    seen: Sequence[np.ndarray],
    keep: Sequence[int],
    *,
    excluded: Sequence[np.ndarray] | None = None,
    masks: Sequence[np.ndarray | None] | None = None,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[int]]:
    """Each row's candidates (ids, scores in retrieval order) without padding (id 0), its
    ``seen`` ids, its ``excluded`` ids and the ids its ``masks`` row (bool over internal
    ids; None: every id) leaves out, the first ``keep`` of them; and per row how many
    candidates the filter (exclusions and mask) removed ahead of the last one kept, or
    in all where fewer than ``keep`` were left.

    One membership test for all rows: (row, id) pairs are encoded as one integer each.
    """
    if not len(ids):
        return [], []
    lengths = np.fromiter((len(row) for row in ids), np.int64, len(ids))
    flat = np.concatenate(ids).astype(np.int64, copy=False)
    wanted = [np.asarray(row, dtype=np.int64) for row in seen]
    dropped = []  # only where some row excludes items: the unfiltered path skips them
    if excluded is not None and any(len(row) for row in excluded):
        dropped = [np.asarray(row, dtype=np.int64) for row in excluded]
    span = 1 + max(
        int(flat.max(initial=0)), *(int(row.max(initial=0)) for row in wanted + dropped), 0
    )
    owner = np.repeat(np.arange(len(ids)), lengths)
    pairs = owner * span + flat
    served = (flat > 0) & ~np.isin(pairs, _row_keys(wanted, span))
    ends = np.cumsum(lengths)
    removed = None  # (sum of lengths,) bool: what the filter took out of the served
    if dropped:
        removed = served & np.isin(pairs, _row_keys(dropped, span))
    if masks is not None and any(mask is not None for mask in masks):
        removed = np.zeros(len(flat), dtype=bool) if removed is None else removed
        for row, mask in enumerate(masks):
            if mask is not None:
                lo, hi = ends[row] - lengths[row], ends[row]
                removed[lo:hi] |= served[lo:hi] & ~mask[flat[lo:hi]]
    kept, counts = [], []
    for row, count in enumerate(keep):
        lo, hi = ends[row] - lengths[row], ends[row]
        mine = served[lo:hi]
        taken = 0
        if removed is not None:
            gone = removed[lo:hi]
            mine = mine & ~gone
            # Up to the last kept candidate (the list as served), or all when short.
            positions = np.flatnonzero(mine)
            reach = positions[count - 1] + 1 if 0 < count <= len(positions) else len(mine)
            taken = int(np.count_nonzero(gone[:reach]))
        kept.append((np.asarray(ids[row])[mine][:count], np.asarray(scores[row])[mine][:count]))
        counts.append(taken)
    return kept, counts


def _row_keys(rows: list[np.ndarray], span: int) -> np.ndarray:
    """Each row's ids as (row, id) keys, ``row * span + id``, in one array."""
    if not rows:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([row + position * span for position, row in enumerate(rows)])


def filtered_depth(need: int, n_items: int, eligible: Eligible) -> int:
    """How deep a search must go for ``need`` candidates to survive a filter that keeps
    ``eligible`` items of ``n_items``, if the filter is unrelated to the scores: the depth
    where the expected survivors exceed ``need`` by ``SURVIVOR_SIGMAS`` standard
    deviations (at most the catalogue)."""
    if eligible.mask is None or eligible.count == 0:
        return min(need, n_items)  # nothing to filter, or nothing can survive
    share = eligible.count / n_items
    return min(n_items, math.ceil((need + SURVIVOR_SIGMAS * math.sqrt(need)) / share))


def first_depth(need: int, n_items: int, eligible: Eligible) -> int:
    """The depth of a request's first search (the retrieval the cache holds): deep enough
    for ``need`` candidates to survive its filter, but at most ``FIRST_SEARCH_GROWTH``
    times ``need``."""
    return min(filtered_depth(need, n_items, eligible), FIRST_SEARCH_GROWTH * min(need, n_items))

"""Candidate filters: what retrieval found, without what a request must never be served.

Every path that turns retrieved ids into an answer (the online pipeline, the rerank of a
single request, the batch job, the CTR head's training examples) removes padding slots and
the request's seen items here, so they all drop the same items.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def drop_seen(
    ids: Sequence[np.ndarray],
    scores: Sequence[np.ndarray],
    seen: Sequence[np.ndarray],
    keep: Sequence[int],
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each row's candidates (ids, scores in retrieval order) without padding (id 0) and
    without its ``seen`` ids, the first ``keep`` of them.

    One membership test for all rows: (row, id) pairs are encoded as one integer each.
    """
    if not len(ids):
        return []
    lengths = np.fromiter((len(row) for row in ids), np.int64, len(ids))
    flat = np.concatenate(ids).astype(np.int64, copy=False)
    wanted = [np.asarray(row, dtype=np.int64) for row in seen]
    span = 1 + max(int(flat.max(initial=0)), *(int(row.max(initial=0)) for row in wanted), 0)
    owner = np.repeat(np.arange(len(ids)), lengths)
    excluded = np.concatenate([row + position * span for position, row in enumerate(wanted)])
    served = (flat > 0) & ~np.isin(owner * span + flat, excluded)
    ends = np.cumsum(lengths)
    kept = []
    for row, count in enumerate(keep):
        mine = served[ends[row] - lengths[row] : ends[row]]
        kept.append((np.asarray(ids[row])[mine][:count], np.asarray(scores[row])[mine][:count]))
    return kept

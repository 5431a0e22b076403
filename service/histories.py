"""Histories as model inputs: the one definition of a left-padded window with time gaps.

Training, offline evaluation, batch recommendation and the online service all build encoder
inputs here, so a history produces the same numbers wherever it is encoded.
"""

from __future__ import annotations

import numpy as np

PAD = 0


def left_padded_window(
    items: np.ndarray,
    timestamps: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    max_len: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The last ``max_len`` events of each range ``[start, end)``, left-padded with 0.

    Returns ``item_ids`` int64 [B, L] and ``time_deltas`` float32 [B, L], where L is the
    longest window in the batch and a delta is the seconds since the previous event of the
    same range (0 for its first event and for padding). Deltas are taken before truncation,
    so a window sees the same gap for its first item that the full history had.
    """
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    width = int(min(max_len, max(1, (ends - starts).max(initial=1))))
    index = ends[:, None] - width + np.arange(width)[None, :]  # (b, L)
    valid = index >= starts[:, None]
    safe = np.where(valid, index, 0)
    item_ids = np.where(valid, items[safe], PAD).astype(np.int64)
    has_previous = valid & (index - 1 >= starts[:, None])
    previous = np.where(has_previous, safe - 1, 0)
    deltas = np.where(has_previous, timestamps[safe] - timestamps[previous], 0)
    return item_ids, np.maximum(deltas, 0).astype(np.float32)

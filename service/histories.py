"""Histories as model inputs: the one definition of a left-padded window of events.

Training, offline evaluation, batch recommendation and the online service all build encoder
inputs (:func:`left_padded_window`) and the CTR head's history inputs
(:func:`left_padded_events`) here, so a history produces the same numbers wherever it is
encoded or scored.
"""

from __future__ import annotations

import numpy as np

PAD = 0


def _window_positions(
    starts: np.ndarray, ends: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """For each range ``[start, end)``, the indices of its newest ``width`` events (b, width),
    left-padded (padding slots index 0), and which slots hold an event."""
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    index = ends[:, None] - width + np.arange(width)[None, :]  # (b, width)
    valid = index >= starts[:, None]
    return np.where(valid, index, 0), valid


def left_padded_events(
    items: np.ndarray, timestamps: np.ndarray, starts: np.ndarray, ends: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """The newest ``width`` events of each range ``[start, end)``: ids and times (b, width),
    left-padded with id 0 and time 0."""
    safe, valid = _window_positions(starts, ends, width)
    ids = np.where(valid, items[safe], PAD).astype(np.int64)
    times = np.where(valid, timestamps[safe], 0).astype(np.int64)
    return ids, times


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
    safe, valid = _window_positions(starts, ends, width)
    item_ids = np.where(valid, items[safe], PAD).astype(np.int64)
    has_previous = valid & (safe - 1 >= starts[:, None])
    previous = np.where(has_previous, safe - 1, 0)
    deltas = np.where(has_previous, timestamps[safe] - timestamps[previous], 0)
    return item_ids, np.maximum(deltas, 0).astype(np.float32)

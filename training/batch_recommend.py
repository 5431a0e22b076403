"""Batch recommendations: top-K for every user of a dataset through an exported bundle.

    python -m training batch-recommend --data synthetic --models-dir models --out recs.parquet

It runs the serving path — the ONNX user encoder and the faiss index of the bundle, no
PyTorch — over each user's history (``--history all``: every event, to recommend what
comes next; ``test``: all but the last event, the offline evaluation's test history),
masks the items already in that history, and writes ``user, rank, item, score`` to Parquet.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from service.bundle import Bundle
from service.histories import left_padded_window
from training.data import SequenceData

LOG = logging.getLogger(__name__)


def history_ranges(data: SequenceData, history: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, start, end) of the histories to recommend from."""
    if history == "all":
        users = np.arange(data.n_users)
        return users, data.offsets[:-1], data.offsets[1:]
    users, history_end, _ = data.eval_examples(history)
    return users, data.offsets[users], history_end


def recommend_ranges(
    bundle: Bundle,
    encoder: str,
    items: np.ndarray,
    timestamps: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, bundle item ids) for histories ``items[start:end]`` (bundle ids).

    Items of the whole history are excluded, not just those inside the encoder's window.
    """
    retriever = bundle.retrievers[encoder]
    ids, deltas = left_padded_window(items, timestamps, starts, ends, retriever.max_len)
    users = retriever.encoder.encode(ids, deltas)
    seen_counts = ends - starts
    depth = int(min(bundle.catalogue.n_items, k + seen_counts.max(initial=0)))
    scores, found = retriever.index.search(users, depth)
    out_scores = np.full((len(starts), k), -np.inf, dtype=np.float32)
    out_ids = np.zeros((len(starts), k), dtype=np.int64)
    for row, (start, end) in enumerate(zip(starts, ends, strict=True)):
        keep = ~np.isin(found[row], items[start:end]) & (found[row] > 0)
        chosen = np.flatnonzero(keep)[:k]
        out_scores[row, : len(chosen)] = scores[row, chosen]
        out_ids[row, : len(chosen)] = found[row, chosen]
    return out_scores, out_ids


def batch_recommend(
    bundle: Bundle,
    data: SequenceData,
    out: str | Path,
    encoder: str | None = None,
    k: int = 10,
    history: str = "all",
    batch_size: int = 512,
) -> dict:
    """Write top-k recommendations of every user to Parquet; returns counts and throughput."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    encoder = encoder or bundle.default_encoder
    catalogue = bundle.catalogue
    # Translate the data's item ids into the bundle's through raw ids (0 = unknown).
    to_bundle = catalogue.internal_ids(data.item_map.raw.tolist())
    to_bundle[0] = 0
    items = to_bundle[data.items]
    users, starts, ends = history_ranges(data, history)
    columns: dict[str, list] = {"user": [], "rank": [], "item": [], "score": []}
    started = time.perf_counter()
    for lo in tqdm(range(0, len(users), batch_size), desc="recommending", unit="batch"):
        hi = lo + batch_size
        scores, ids = recommend_ranges(
            bundle, encoder, items, data.timestamps, starts[lo:hi], ends[lo:hi], k
        )
        valid = ids > 0
        rows, ranks = np.nonzero(valid)
        columns["user"].append(data.user_map.raw[users[lo:hi][rows] + 1])
        columns["rank"].append(ranks + 1)
        columns["item"].append(catalogue.raw_ids[ids[valid]].astype(str))
        columns["score"].append(scores[valid])
    seconds = time.perf_counter() - started
    table = pa.table(
        {name: np.concatenate(parts) if parts else [] for name, parts in columns.items()}
    )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    return {
        "users": int(len(users)),
        "rows": int(table.num_rows),
        "seconds": seconds,
        "users_per_second": len(users) / seconds if seconds else float("inf"),
        "encoder": encoder,
        "bundle": bundle.name,
    }

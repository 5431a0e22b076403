"""Batch recommendations: top-K for every user of a dataset through an exported bundle.

    python -m training batch-recommend --data synthetic --models-dir models --out recs.parquet
    python -m training batch-recommend --data synthetic --out recs.parquet \
        --warm-cache --redis-url redis://127.0.0.1:6379/0

It runs the serving path — the ONNX user encoder and the faiss index of the bundle, no
PyTorch — over each user's history (``--history all``: every event, to recommend what
comes next; ``test``: all but the last event, the offline evaluation's test history),
masks the items already in that history and the items the catalogue marks unavailable,
and writes ``user, rank, item, score`` to Parquet.

``--catalogue`` serves the catalogue as the service does: the catalogue API's writes read
from the deployment's Redis (``service.catalogue_store``), so withdrawn and unavailable
items are never written and items added since the export are retrieved beside the index.

``python -m training histories`` writes the histories (``histories_table``) as Parquet
partitions, which ``--engine ray`` (``training.ray_engine``) reads: a pool of Ray actors
that run ``recommendation_rows``, this engine's batch.

``--warm-cache`` also loads each user's history into Redis and stores the retrieval the
service would compute for it, under the same key (bundle, encoder, digest of the encoder
input), so the first ``/recommend`` with just the ``user_id`` is already a cache hit.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from service.bundle import Bundle
from service.cache import BehaviourCache, history_digest
from service.catalogue import Catalogue
from service.filters import drop_excluded, filtered_depth
from service.histories import left_padded_window
from service.live_catalogue import ServedCatalogue
from service.pipeline import Query, encode_and_search, with_added
from training.console import progress_bar
from training.data import SequenceData
from training.errors import ConfigError, DataFormatError

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
    *,
    starts: np.ndarray,
    ends: np.ndarray,
    k: int,
    served: ServedCatalogue | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, internal item ids) for histories ``items[start:end]`` (bundle ids).

    Items of the whole history are excluded, not just those inside the encoder's window,
    and so are the items the catalogue marks unavailable (as /recommend's default filter
    excludes them); ``served`` (default: the bundle's own items) adds the catalogue API's
    writes.
    """
    served = served or ServedCatalogue.of_bundle(bundle)
    retriever = bundle.retrievers[encoder]
    ids, deltas = left_padded_window(items, timestamps, starts, ends, retriever.max_len)
    users = retriever.encoder.encode(ids, deltas)
    seen_counts = ends - starts
    available = served.catalogue.eligible(None)
    depth = filtered_depth(k + int(seen_counts.max(initial=0)), served.catalogue.n_items, available)
    scores, found = retriever.index.search(users, depth)
    candidates = list(zip(found, scores, strict=True))
    if len(served.added[encoder].ids):
        candidates = with_added(served.added[encoder], users, candidates)
    kept, _ = drop_excluded(
        [row for row, _ in candidates],
        [row for _, row in candidates],
        [items[start:end] for start, end in zip(starts, ends, strict=True)],
        [k] * len(starts),
        masks=[available.mask] * len(starts),
    )
    out_scores = np.full((len(starts), k), -np.inf, dtype=np.float32)
    out_ids = np.zeros((len(starts), k), dtype=np.int64)
    for row, (ids, row_scores) in enumerate(kept):
        out_scores[row, : len(ids)] = row_scores
        out_ids[row, : len(ids)] = ids
    return out_scores, out_ids


# The output table of both engines: one row per recommended item, best first per user.
RESULT_COLUMNS = ("user", "rank", "item", "score")


def recommendation_rows(
    bundle: Bundle,
    encoder: str,
    users: np.ndarray,
    items: np.ndarray,
    timestamps: np.ndarray,
    *,
    starts: np.ndarray,
    ends: np.ndarray,
    k: int,
    served: ServedCatalogue,
) -> dict[str, np.ndarray]:
    """The ``user, rank, item, score`` rows of the top-k of each history
    ``items[start:end]`` (bundle ids) of the raw ``users``, in their order; a user whose
    catalogue holds fewer than k eligible items gets fewer rows. Every engine's batch."""
    scores, ids = recommend_ranges(
        bundle, encoder, items, timestamps, starts=starts, ends=ends, k=k, served=served
    )
    valid = ids > 0
    rows, ranks = np.nonzero(valid)
    return {
        "user": np.asarray(users)[rows],
        "rank": ranks + 1,
        "item": served.catalogue.raw_ids[ids[valid]].astype(str),
        "score": scores[valid],
    }


def batch_recommend(
    bundle: Bundle,
    data: SequenceData,
    out: str | Path,
    *,
    encoder: str | None = None,
    k: int = 10,
    history: str = "all",
    batch_size: int = 512,
    served: ServedCatalogue | None = None,
) -> dict:
    """Write top-k recommendations of every user to Parquet; returns counts and throughput.
    ``served``: the catalogue as the service serves it (default: the bundle's items)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    encoder = encoder or bundle.default_encoder
    served = served or ServedCatalogue.of_bundle(bundle)
    catalogue = bundle.catalogue
    # Translate the data's item ids into the bundle's through raw ids (0 = unknown).
    to_bundle = catalogue.internal_ids(data.item_map.raw.tolist())
    to_bundle[0] = 0
    items = to_bundle[data.items]
    users, starts, ends = history_ranges(data, history)
    columns: dict[str, list] = {name: [] for name in RESULT_COLUMNS}
    started = time.perf_counter()
    for lo in progress_bar(range(0, len(users), batch_size), desc="recommending", unit="batch"):
        hi = lo + batch_size
        batch = recommendation_rows(
            bundle,
            encoder,
            data.user_map.raw[users[lo:hi] + 1],
            items,
            data.timestamps,
            starts=starts[lo:hi],
            ends=ends[lo:hi],
            k=k,
            served=served,
        )
        for name, values in batch.items():
            columns[name].append(values)
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
        "catalogue_version": served.version,
    }


def histories_table(data: SequenceData, history: str = "all"):
    """The histories ``batch_recommend`` recommends from, as a table of raw ids: ``user``
    (string), ``items`` (list of strings) and ``timestamps`` (list of int64 seconds), one
    row per user in the data's user order, each history in time order."""
    import pyarrow as pa

    users, starts, ends = history_ranges(data, history)
    lengths = ends - starts
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    # Event positions of every history, concatenated: start of its user + rank in it.
    events = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
    offsets = pa.array(offsets, type=pa.int64())
    return pa.table(
        {
            "user": pa.array(data.user_map.raw[users + 1].astype(str)),
            "items": pa.LargeListArray.from_arrays(
                offsets, pa.array(data.item_map.raw[data.items[events]].astype(str))
            ),
            "timestamps": pa.LargeListArray.from_arrays(
                offsets, pa.array(data.timestamps[events], type=pa.int64())
            ),
        }
    )


def write_histories(
    data: SequenceData, out: str | Path, *, history: str = "all", rows_per_file: int = 100_000
) -> dict:
    """Write ``histories_table`` as Parquet files ``part-NNNNN.parquet`` into the new or
    empty folder ``out``; returns counts."""
    import pyarrow.parquet as pq

    if rows_per_file < 1:
        raise ConfigError(f"rows per file must be at least 1, got {rows_per_file}")
    out = empty_folder(out)
    table = histories_table(data, history)
    parts = range(0, max(table.num_rows, 1), rows_per_file)
    for part, lo in enumerate(parts):
        pq.write_table(table.slice(lo, rows_per_file), out / f"part-{part:05d}.parquet")
    return {
        "users": table.num_rows,
        "events": len(table["items"].combine_chunks().flatten()),
        "files": len(parts),
    }


def empty_folder(path: str | Path) -> Path:
    """``path`` as a new or empty folder: files of an earlier run mixed into a dataset's
    partitions would be read as part of it."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"{path}: exists and is not an empty folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_histories_schema(schema, where: str | Path) -> None:
    """Refuse a histories dataset without ``histories_table``'s columns and types."""
    import pyarrow.types as pat

    def is_list_of(field_type, check) -> bool:
        return (pat.is_list(field_type) or pat.is_large_list(field_type)) and check(
            field_type.value_type
        )

    def is_text(field_type) -> bool:
        return pat.is_string(field_type) or pat.is_large_string(field_type)

    expected = {
        "user": (is_text, "string"),
        "items": (lambda t: is_list_of(t, is_text), "list of strings"),
        "timestamps": (lambda t: is_list_of(t, pat.is_integer), "list of integers"),
    }
    names = list(schema.names)
    for name, (check, wanted) in expected.items():
        if name not in names:
            raise DataFormatError(where, None, f"no column {name!r} (columns: {names})")
        if not check(schema.field(name).type):
            raise DataFormatError(
                where, None, f"column {name!r} is {schema.field(name).type}, expected {wanted}"
            )


def history_batch(table, catalogue: Catalogue, where: str | Path):
    """(users, items, timestamps, starts, ends) of a batch of the histories dataset: raw
    users, bundle item ids (0: unknown to the bundle, as ``batch_recommend`` maps them) of
    all histories concatenated, each history sorted by time (ties keep their order)."""
    import pyarrow.compute as pc

    users = table.column("user")
    items = table.column("items").combine_chunks()
    stamps = table.column("timestamps").combine_chunks()
    for name, column in (("user", users), ("items", items), ("timestamps", stamps)):
        if column.null_count:
            raise DataFormatError(where, None, f"column {name!r} has nulls")
    lengths = pc.list_value_length(items).to_numpy(zero_copy_only=False).astype(np.int64)
    stamp_lengths = pc.list_value_length(stamps).to_numpy(zero_copy_only=False)
    if (lengths != stamp_lengths).any():
        row = int(np.flatnonzero(lengths != stamp_lengths)[0])
        raise DataFormatError(
            where,
            None,
            f"user {users[row]}: {lengths[row]} items but {stamp_lengths[row]} timestamps",
        )
    ends = np.cumsum(lengths)
    starts = ends - lengths
    raw_items = items.flatten().to_numpy(zero_copy_only=False)
    timestamps = stamps.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    order = np.lexsort((timestamps, np.repeat(np.arange(len(lengths)), lengths)))
    ids = catalogue.internal_ids(raw_items[order].tolist())
    return users.to_numpy(zero_copy_only=False), ids, timestamps[order], starts, ends


async def warm_cache(
    cache: BehaviourCache,
    bundle: Bundle,
    data: SequenceData,
    *,
    encoder: str | None = None,
    candidates: int = 200,
    batch_size: int = 512,
) -> dict:
    """Store every user's history and its retrieval in the service's cache; returns counts.

    It reproduces what the service does for a ``user_id``-only request: the newest
    ``cache.history_cap`` events, their known items, the encoder window of those, and a
    search deep enough for ``candidates`` unseen items.
    """
    encoder = encoder or bundle.default_encoder
    retriever = bundle.retrievers[encoder]
    to_bundle = bundle.catalogue.internal_ids(data.item_map.raw.tolist())
    to_bundle[0] = 0
    starts = np.maximum(data.offsets[:-1], data.offsets[1:] - cache.history_cap)
    ends = data.offsets[1:]
    stored = 0
    for lo in progress_bar(range(0, data.n_users, batch_size), desc="warming cache", unit="batch"):
        users = np.arange(lo, min(lo + batch_size, data.n_users))
        windows = []
        events_of = {}
        for user in users:
            span = slice(starts[user], ends[user])
            raw = data.item_map.raw[data.items[span]]
            order = np.lexsort((raw, data.timestamps[span]))  # Redis's order: ts, then member
            raw, stamps = raw[order], data.timestamps[span][order]
            events_of[user] = list(zip(raw.tolist(), stamps.tolist(), strict=True))
            ids = to_bundle[data.items[span]][order]
            known = ids > 0
            ids, stamps = ids[known], stamps[known]
            if len(ids) == 0:
                windows.append(None)
                continue
            window = left_padded_window(
                ids, stamps, np.array([0]), np.array([len(ids)]), retriever.max_len
            )
            windows.append((ids, stamps, window))
        present = [i for i, w in enumerate(windows) if w is not None]
        if not present:
            continue
        # The service's own batched encode + search, so warmed entries are what it computes.
        queries = []
        for i in present:
            ids, stamps, (window, deltas) = windows[i]
            seen = np.unique(ids)
            queries.append(
                Query(
                    window=window,
                    deltas=deltas,
                    depth=min(bundle.catalogue.n_items, candidates + len(seen)),
                    history_ids=ids,
                    history_ts=stamps,
                    seen=seen,
                    keep=candidates,
                    k=candidates,
                    rerank=False,
                    request_time=0,
                )
            )
        retrieved, _ = encode_and_search(retriever, queries)
        entries = [
            (
                cache.retrieval_key(
                    bundle.name, encoder, history_digest(query.window, query.deltas)
                ),
                entry,
            )
            for entry, query in zip(retrieved, queries, strict=True)
        ]
        await cache.put_retrievals(entries)
        for i in present:
            user = users[i]
            await cache.append_events(str(data.user_map.raw[user + 1]), events_of[user])
            stored += 1
    return {"users_warmed": stored, "encoder": encoder, "bundle": bundle.name}

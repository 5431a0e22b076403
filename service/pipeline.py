"""The synchronous batch kernel: history -> encoder window -> embedding -> candidates ->
(seen items and what the filter leaves out dropped) -> (rerank) -> top k, for a batch of
requests of one retriever.

Two halves, both plain numpy and native calls (no event loop, no Redis):

- :func:`prepare_queries` runs in the worker: it maps raw item ids to the bundle's ids
  (unknown ids are counted, not fatal), orders each history by time and keeps its newest
  ``history_cap`` events, and builds each request's :class:`Query` (the encoder window,
  the search depth, the items never to serve);
- :func:`compute_batch` runs where ``service.compute`` puts it (a thread, or a compute
  process, which is why a ``Query`` carries only arrays, numbers and its filter's
  description): one ONNX call for every query without an embedding, one index search for
  all, the seen items and what each filter leaves out dropped (``service.filters``), a
  filtered search for the queries that kept too few (:func:`search_eligible`), one CTR
  head call for all the reranked ones (``service.ranking``).

A filter travels as its description (``service.catalogue.ItemFilter``, a few hundred
bytes), not as a mask over the catalogue: each side compiles it against its own copy of
the catalogue, once per distinct filter (``Catalogue.eligible``). The first search of a
filtered request is the unfiltered retrieval the behaviour cache holds, deepened for the
share of the catalogue the filter keeps (at most ``FIRST_SEARCH_GROWTH`` times); when it
leaves fewer than ``keep`` candidates, the eligible items are searched themselves: all of
them exactly when they are few (``SUBSET_LIMIT``), else the index ever deeper.

Everything per event or per candidate runs once per batch, so the Python work that holds
the GIL is amortised over the batch. ``service.recommender`` wraps this kernel with the
micro-batcher, the behaviour cache and the answer memo.

:func:`warm_up` runs both halves on made-up requests of every shape serving gives them
before a bundle serves, so that a part that does not fit fails at load, not on the first
request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from service.bundle import Bundle, Retriever
from service.cache import CachedRetrieval
from service.catalogue import NO_ITEMS, Catalogue, Eligible, ItemFilter
from service.errors import BundleError
from service.filters import drop_excluded, filtered_depth, first_depth
from service.histories import left_padded_window
from service.live_catalogue import AddedItems, ServedCatalogue
from service.ranking import Reranked, RerankJob, rerank_batch
from service.retrieval import search_among

STAGES = ("encode", "retrieve", "rerank")
# A filter that keeps at most this many items is searched among its items, exactly, at a
# cost that grows with them; one that keeps more, in the index, deeper each round by
# DEEPENING (docs/BENCHMARKS.md, "Filters").
SUBSET_LIMIT = 32_768
DEEPENING = 4


@dataclass(frozen=True)
class RankingRequest:
    """What one request asks of the kernel: its raw events and how to rank for them."""

    events: list[tuple[str, int]]  # (raw item id, unix seconds), in any order
    k: int
    keep: int  # candidates kept after the seen items are dropped: max(candidates, k)
    exclude_seen: bool
    rerank: bool
    history_cap: int  # newest known events read from the request
    request_time: int
    item_filter: ItemFilter | None = None  # None: available items only


@dataclass
class PreparedHistory:
    """A request's known events, oldest first, as the encoder and the head read them."""

    item_ids: np.ndarray  # (n,) internal ids of known items
    timestamps: np.ndarray  # (n,) int64
    unknown: int  # events whose item is not in the bundle (added items included)
    truncated: bool  # known events beyond the cap were dropped
    added: np.ndarray = field(default_factory=lambda: NO_ITEMS)  # items added since export


@dataclass
class Query:
    """One request's share of a batch computation (it crosses to a compute process)."""

    window: np.ndarray  # (1, L) encoder input, left-padded, cut to the history's own width
    deltas: np.ndarray  # (1, L) seconds since the previous event
    depth: int  # how deep to search so that ``keep`` candidates survive the seen items
    history_ids: np.ndarray  # (n,) known events, oldest first (the head's history features)
    history_ts: np.ndarray  # (n,)
    seen: np.ndarray  # ids never to serve (empty unless exclude_seen)
    keep: int
    k: int
    rerank: bool
    request_time: int
    embedding: np.ndarray | None = None  # (d,) from a cache entry too shallow to reuse
    cached: CachedRetrieval | None = None  # a cache hit: no encoding, no search
    item_filter: ItemFilter | None = None  # compiled where the query is computed
    excluded: np.ndarray = field(default_factory=lambda: NO_ITEMS)  # excluded one by one
    # /items/{id}/similar: the item whose vector is the query, read where it is computed
    # (an added item's vector exists only where the models are).
    anchor: int | None = None


@dataclass
class Ranked:
    """A query's result: its best ``k`` and the retrieval to cache."""

    ids: np.ndarray  # (<= k,) internal ids, best first
    scores: np.ndarray  # the served score: the head's logit, or the retrieval score
    retrieval_scores: np.ndarray
    retrieval_ranks: np.ndarray  # each item's 0-based position in retrieval order
    reranked: bool
    timings: dict[str, float]  # milliseconds per stage, each its batch's
    retrieval: CachedRetrieval | None  # computed here (None for a cache hit)
    filtered: int = 0  # candidates the filter removed (service.filters.drop_excluded)


def prepare_histories(
    catalogue: Catalogue, histories: list[list[tuple[str, int]]], caps: list[int]
) -> list[PreparedHistory]:
    """Each history's known events ordered by time (stable), the newest ``cap`` of them;
    one pass over all events of all histories. Items added since the export have no
    trained vector, so the encoder never reads them: they are counted as unknown and
    kept aside (``added``) for the items never to serve again."""
    lengths = np.fromiter((len(events) for events in histories), np.int64, len(histories))
    total = int(lengths.sum())
    ids = catalogue.internal_ids([item for events in histories for item, _ in events])
    stamps = np.fromiter((ts for events in histories for _, ts in events), np.int64, total)
    owner = np.repeat(np.arange(len(histories)), lengths)
    order = np.lexsort((stamps, owner))  # by history, then time; ties keep their order
    ids, stamps, owner = ids[order], stamps[order], owner[order]
    known = ids > 0
    extra = [NO_ITEMS] * len(histories)
    if catalogue.n_trained < catalogue.n_items:
        late = ids > catalogue.n_trained
        for row in np.unique(owner[late]).tolist():
            extra[row] = np.unique(ids[late & (owner == row)])
        known &= ~late
    unknown = np.bincount(owner[~known], minlength=len(histories))
    ids, stamps, owner = ids[known], stamps[known], owner[known]
    counts = np.bincount(owner, minlength=len(histories))
    caps_of = np.asarray(caps, dtype=np.int64)
    # Only dropped known events truncate what the encoder sees.
    from_end = np.cumsum(counts)[owner] - 1 - np.arange(len(ids))
    newest = from_end < caps_of[owner]
    ids, stamps = ids[newest], stamps[newest]
    ends = np.cumsum(np.minimum(counts, caps_of))
    starts = ends - np.minimum(counts, caps_of)
    return [
        PreparedHistory(ids[a:b], stamps[a:b], int(u), bool(n > cap), added)
        for a, b, u, n, cap, added in zip(
            starts, ends, unknown, counts, caps_of, extra, strict=True
        )
    ]


def prepare_queries(
    catalogue: Catalogue, retriever: Retriever, requests: list[RankingRequest]
) -> tuple[list[PreparedHistory], list[Query | None]]:
    """Each request's prepared history and its query (None: no known item, the caller's
    popularity fallback); windows, depths and seen items in one pass over the batch."""
    histories = prepare_histories(
        catalogue, [r.events for r in requests], [r.history_cap for r in requests]
    )
    queries: list[Query | None] = [None] * len(requests)
    usable = [i for i, history in enumerate(histories) if len(history.item_ids)]
    if not usable:
        return histories, queries
    lengths = np.array([len(histories[i].item_ids) for i in usable])
    ends = np.cumsum(lengths)
    item_ids = np.concatenate([histories[i].item_ids for i in usable])
    ids, deltas = left_padded_window(
        item_ids,
        np.concatenate([histories[i].timestamps for i in usable]),
        ends - lengths,
        ends,
        retriever.max_len,
    )
    # The distinct items of every history, from one sort of (request, item) keys.
    span = catalogue.n_items + 1
    distinct = np.unique(np.repeat(np.arange(len(usable)), lengths) * span + item_ids)
    bounds = np.searchsorted(distinct, np.arange(len(usable) + 1) * span)
    for row, (i, length) in enumerate(zip(usable, lengths.tolist(), strict=True)):
        request, history = requests[i], histories[i]
        # Each window is cut to its own width, exactly as it would be encoded alone, so
        # it (and the cache key made from it) does not depend on the batch it came in.
        width = min(retriever.max_len, length)
        seen = distinct[bounds[row] : bounds[row + 1]] - row * span
        if len(history.added):
            seen = np.union1d(seen, history.added)
        if not request.exclude_seen:
            seen = seen[:0]
        excluded = catalogue.excluded(request.item_filter)
        queries[i] = Query(
            window=ids[row : row + 1, -width:],
            deltas=deltas[row : row + 1, -width:],
            depth=first_depth(
                request.keep + len(seen) + len(excluded),
                catalogue.n_items,
                catalogue.eligible(request.item_filter),
            ),
            history_ids=history.item_ids,
            history_ts=history.timestamps,
            seen=seen,
            keep=request.keep,
            k=request.k,
            rerank=request.rerank,
            request_time=request.request_time,
            item_filter=request.item_filter,
            excluded=excluded,
        )
    return histories, queries


def encode_and_search(
    retriever: Retriever, queries: list[Query]
) -> tuple[list[CachedRetrieval], dict[str, float]]:
    """One ONNX call for every query without an embedding and one index search for all,
    each to its own depth; with the (encode, retrieve) milliseconds of the batch.

    Windows of different lengths are left-padded to the longest, which changes no
    embedding (encoders are padding-invariant, a test checks it).
    """
    started = time.perf_counter()
    embeddings = [query.embedding for query in queries]
    missing = [i for i, e in enumerate(embeddings) if e is None]
    if missing:
        width = max(queries[i].window.shape[1] for i in missing)
        ids = np.zeros((len(missing), width), dtype=np.int64)
        deltas = np.zeros((len(missing), width), dtype=np.float32)
        for row, i in enumerate(missing):
            length = queries[i].window.shape[1]
            ids[row, width - length :] = queries[i].window[0]
            deltas[row, width - length :] = queries[i].deltas[0]
        for row, vector in zip(missing, retriever.encoder.encode(ids, deltas), strict=True):
            embeddings[row] = vector
    encoded = time.perf_counter()
    # A GPU index answers at most GPU_MAX_K per query: deeper asks get what it has.
    depth = min(max(query.depth for query in queries), retriever.index.max_depth)
    scores, found = retriever.index.search(np.stack(embeddings), depth)
    timings = {"encode": elapsed_ms(started, encoded), "retrieve": elapsed_ms(encoded)}
    return [
        CachedRetrieval(embeddings[i], found[i, : query.depth], scores[i, : query.depth])
        for i, query in enumerate(queries)
    ], timings


def compute_batch(
    retriever: Retriever, served: ServedCatalogue, queries: list[Query]
) -> list[Ranked]:
    """Everything but the cache for a batch of queries, in one thread: encode and search
    the misses together (the items added since the export beside the index), drop each
    query's seen items and what its filter leaves out (searching the eligible items for
    the queries left short), rerank all with one head call."""
    catalogue, item_features = served.catalogue, served.item_features
    item_vectors = served.vectors[retriever.name]
    added = served.added[retriever.name]
    retrievals: list[CachedRetrieval | None] = [query.cached for query in queries]
    timings = dict.fromkeys(STAGES, 0.0)
    for query in queries:
        if query.anchor is not None and query.embedding is None:
            query.embedding = np.asarray(item_vectors[query.anchor], dtype=np.float32)
    misses = [i for i, entry in enumerate(retrievals) if entry is None]
    if misses:
        found, took = encode_and_search(retriever, [queries[i] for i in misses])
        for i, entry in zip(misses, found, strict=True):
            retrievals[i] = entry
        timings.update(took)
    candidates = [
        (entry.ids[: q.depth], entry.scores[: q.depth])
        for q, entry in zip(queries, retrievals, strict=True)
    ]
    if len(added.ids):
        started = time.perf_counter()
        candidates = with_added(
            added, np.stack([entry.embedding for entry in retrievals]), candidates
        )
        timings["retrieve"] += elapsed_ms(started)
    eligible = [catalogue.eligible(query.item_filter) for query in queries]
    kept, filtered = drop_excluded(
        [ids for ids, _ in candidates],
        [scores for _, scores in candidates],
        [query.seen for query in queries],
        [query.keep for query in queries],
        excluded=[query.excluded for query in queries],
        masks=[items.mask for items in eligible],
    )
    # Filtered queries left short while eligible items remain beyond what was searched.
    short = [
        i
        for i, query in enumerate(queries)
        if eligible[i].mask is not None
        and len(kept[i][0]) < min(query.keep, eligible[i].count)
        and np.count_nonzero(candidates[i][0]) < catalogue.n_items
    ]
    if short:
        started = time.perf_counter()
        refilled = search_eligible(
            retriever,
            [queries[i] for i in short],
            np.stack([retrievals[i].embedding for i in short]),
            [eligible[i] for i in short],
            vectors=item_vectors,
            added=added,
        )
        for i, found in zip(short, refilled, strict=True):
            # ``filtered`` stays the first search's count, whichever way this search
            # went, so that it does not depend on SUBSET_LIMIT or the index.
            kept[i] = found
        timings["retrieve"] += elapsed_ms(started)
    head = retriever.ctr_head if item_features is not None else None
    wanted = [
        i
        for i, query in enumerate(queries)
        if query.rerank and head is not None and len(kept[i][0])
    ]
    ranked: dict[int, Reranked] = {}
    if wanted:
        started = time.perf_counter()
        reranked = rerank_batch(
            head,
            item_features,
            item_vectors,
            [
                RerankJob(
                    user_embedding=retrievals[i].embedding,
                    candidate_ids=kept[i][0],
                    retrieval_scores=kept[i][1],
                    history_ids=queries[i].history_ids,
                    history_ts=queries[i].history_ts,
                    request_time=queries[i].request_time,
                )
                for i in wanted
            ],
        )
        timings["rerank"] = elapsed_ms(started)
        ranked = dict(zip(wanted, reranked, strict=True))
    results = []
    for i, query in enumerate(queries):
        order = ranked.get(i)
        if order is None:  # not reranked: retrieval order is the served order
            ids, scores = kept[i]
            order = Reranked(ids, scores, scores, np.arange(len(ids)))
        results.append(
            Ranked(
                ids=order.ids[: query.k],
                scores=order.logits[: query.k],
                retrieval_scores=order.retrieval_scores[: query.k],
                retrieval_ranks=order.retrieval_ranks[: query.k],
                reranked=i in ranked,
                timings=timings,
                # Only a new retrieval travels back (a hit's is the caller's already).
                retrieval=retrievals[i] if query.cached is None else None,
                filtered=filtered[i],
            )
        )
    return results


def with_added(
    added: AddedItems,
    embeddings: np.ndarray,
    candidates: list[tuple[np.ndarray, np.ndarray]],
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each row's candidates (ids, scores, best first) merged with the added items that
    belong among them (exact inner products, comparable with the index's scores), as many
    as the row had: only an added item scoring at least the row's last candidate can enter,
    so most rows sort a handful, not every added item."""
    scores = added.scores(embeddings)
    merged = []
    for row, (found, found_scores) in enumerate(candidates):
        depth = len(found)
        if depth == 0:
            merged.append((found, found_scores))
            continue
        floor = found_scores[-1]  # -inf where the index had fewer items than asked
        entering = np.flatnonzero(scores[row] >= floor)
        if len(entering) > depth:
            entering = entering[np.argpartition(-scores[row, entering], depth - 1)[:depth]]
        if not len(entering):
            merged.append((found, found_scores))
            continue
        all_ids = np.concatenate([found, added.ids[entering]])
        all_scores = np.concatenate([found_scores, scores[row, entering]]).astype(np.float32)
        order = np.argsort(-all_scores, kind="stable")[:depth]
        merged.append((all_ids[order], all_scores[order]))
    return merged


def search_eligible(
    retriever: Retriever,
    queries: list[Query],
    embeddings: np.ndarray,
    eligible: list[Eligible],
    *,
    vectors,
    added: AddedItems,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each query's best ``keep`` candidates (ids, scores) among the items its filter
    keeps, its seen and excluded items aside.

    A filter keeping more than ``SUBSET_LIMIT`` items is searched in the index, as deep as
    :func:`service.filters.filtered_depth` expects to suffice and then ``DEEPENING`` times
    deeper each round, all such queries in one search per round; one that keeps fewer, or
    whose search reached the index's limit (the catalogue, faiss's GPU limit, an IVF's
    probed lists) still short, is searched exactly among its eligible items (``vectors``
    holds the rows of every item, added ones included). The index's results are merged
    with the ``added`` items' before the filter applies.
    """
    n_items = retriever.index.n_items
    limit = retriever.index.max_depth
    needs = [query.keep + len(query.seen) + len(query.excluded) for query in queries]
    results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(queries)
    deep = [i for i, items in enumerate(eligible) if items.count > SUBSET_LIMIT]
    depths = {i: min(limit, filtered_depth(needs[i], n_items, eligible[i])) for i in deep}
    exact = [i for i, items in enumerate(eligible) if items.count <= SUBSET_LIMIT]
    while deep:
        scores, found = retriever.index.search(embeddings[deep], max(depths[i] for i in deep))
        rows = [(found[row, : depths[i]], scores[row, : depths[i]]) for row, i in enumerate(deep)]
        if len(added.ids):
            rows = with_added(added, embeddings[deep], rows)
        kept, _ = drop_excluded(
            [ids for ids, _ in rows],
            [row_scores for _, row_scores in rows],
            [queries[i].seen for i in deep],
            [queries[i].keep for i in deep],
            excluded=[queries[i].excluded for i in deep],
            masks=[eligible[i].mask for i in deep],
        )
        still = []
        for row, i in enumerate(deep):
            if len(kept[row][0]) >= min(queries[i].keep, eligible[i].count):
                results[i] = kept[row]
            elif depths[i] >= limit or np.count_nonzero(found[row, : depths[i]]) < depths[i]:
                exact.append(i)  # as deep as this index goes
            else:
                depths[i] = min(limit, depths[i] * DEEPENING)
                still.append(i)
        deep = still
    # Queries with the same filter share one gather of their eligible items' vectors.
    groups: dict[int, list[int]] = {}
    for i in exact:
        groups.setdefault(id(eligible[i]), []).append(i)
    for group in groups.values():
        items = eligible[group[0]]
        scores, found = search_among(
            vectors, embeddings[group], items.ids, max(needs[i] for i in group)
        )
        kept, _ = drop_excluded(
            list(found),
            list(scores),
            [queries[i].seen for i in group],
            [queries[i].keep for i in group],
            excluded=[queries[i].excluded for i in group],
        )
        for row, i in enumerate(group):
            results[i] = kept[row]
    return results


def similar_query(
    catalogue: Catalogue, item: int, k: int, item_filter: ItemFilter | None = None
) -> Query:
    """The query of /items/{id}/similar: the ``k`` items nearest to ``item`` (an internal
    id) in the retriever's item space, the item itself and what ``item_filter`` leaves
    out aside, searched from the item's own vector (nothing to encode, nothing to rerank)."""
    excluded = catalogue.excluded(item_filter)
    return Query(
        window=np.zeros((1, 0), dtype=np.int64),
        deltas=np.zeros((1, 0), dtype=np.float32),
        depth=first_depth(
            1 + k + len(excluded), catalogue.n_items, catalogue.eligible(item_filter)
        ),
        history_ids=NO_ITEMS,
        history_ts=NO_ITEMS,
        seen=np.array([item], dtype=np.int64),
        keep=k,
        k=k,
        rerank=False,
        request_time=0,
        anchor=item,
        item_filter=item_filter,
        excluded=excluded,
    )


def elapsed_ms(start: float, end: float | None = None) -> float:
    """Milliseconds from ``start`` to ``end`` (default: now), both ``time.perf_counter()``."""
    return ((end if end is not None else time.perf_counter()) - start) * 1000.0


WARM_UP_K = 10  # items asked of each warm-up request (the service's default k)
WARM_UP_GAP_SECONDS = 60  # between a warm-up history's events


def warm_up(bundle: Bundle, batch: int, candidates: int) -> float:
    """Run the serving kernel on the shapes serving will give it; returns the seconds taken.

    What runs is what serves a request: :func:`prepare_queries` on made-up histories of the
    catalogue's items, then :func:`compute_batch` (encoder, index search, seen items
    dropped, CTR head with the catalogue's features), and the query of
    /items/{id}/similar on an item's own vector. So a part that does not fit the others
    fails here, at load, rather than on the first request; and onnxruntime's CUDA provider,
    which grows its memory arena the first time a larger input arrives, and CUDA, which
    loads kernels on their first launch (they made the first requests after a start many
    times slower than warm ones on a GPU, docs/BENCHMARKS.md), have met every shape: each
    history width alone, then batches of 1, 2, 4, ... up to twice ``batch`` (a compute
    process merges the batches that queued meanwhile) at the longest width, each searched
    to ``candidates`` past the history's own items and reranked. BundleError naming the
    retriever and the shape when the kernel fails.
    """
    started = time.perf_counter()
    sizes = [1 << i for i in range((2 * max(batch, 1) - 1).bit_length() + 1)]
    served = ServedCatalogue.of_bundle(bundle)
    catalogue = served.catalogue
    now = int(time.time())
    for name, retriever in bundle.retrievers.items():
        if retriever.encoder is None:
            continue
        shapes = [(1, width) for width in range(1, retriever.max_len + 1)]
        shapes += [(size, retriever.max_len) for size in sizes]
        for size, width in shapes:
            requests = [
                warm_up_request(catalogue, width, row, candidates, now) for row in range(size)
            ]
            try:
                _, queries = prepare_queries(catalogue, retriever, requests)
                ranked = compute_batch(retriever, served, queries)
                if len(ranked) != size:
                    raise ValueError(f"{len(ranked)} results for {size} queries")
            except Exception as exc:
                raise BundleError(
                    f"{bundle.path}: retriever {name!r} fails the serving kernel on a warm-up "
                    f"batch of {size} histories of {width} events ({type(exc).__name__}: {exc})"
                ) from exc
        try:
            query = similar_query(catalogue, 1, WARM_UP_K)
            compute_batch(retriever, served, [query])
        except Exception as exc:
            raise BundleError(
                f"{bundle.path}: retriever {name!r} cannot search its index for an item's "
                f"own vector (/items/{{id}}/similar) ({type(exc).__name__}: {exc})"
            ) from exc
    return time.perf_counter() - started


def warm_up_request(
    catalogue: Catalogue, width: int, row: int, candidates: int, now: int
) -> RankingRequest:
    """A made-up request: ``width`` distinct catalogue items (as far as there are), one a
    minute up to ``now``, its items excluded from the answer and the answer reranked."""
    n_items = catalogue.n_items
    items = [(row * width + j) % n_items + 1 for j in range(width)]
    return RankingRequest(
        events=[
            (str(catalogue.raw_ids[item]), now - (width - j) * WARM_UP_GAP_SECONDS)
            for j, item in enumerate(items)
        ],
        k=WARM_UP_K,
        keep=max(candidates, WARM_UP_K),
        exclude_seen=True,
        rerank=True,
        history_cap=width,
        request_time=now,
    )

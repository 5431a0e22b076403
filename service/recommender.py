"""The recommendation pipeline: history -> user embedding -> candidates -> (rerank) -> top k.

One request goes through these steps (timed separately):

1. map raw item ids to the bundle's ids (unknown ids are counted, not fatal), order the
   events by time and keep the most recent ``request_history_cap``;
2. build the encoder input window (``service.histories``) and its digest; look the digest
   up in the behaviour cache — a hit skips encoding and retrieval;
3. otherwise encode with the retriever's ONNX graph and search its index deep enough to
   survive the removal of seen items, and store both in the cache;
4. remove seen items when asked, rerank with the CTR head when the bundle has one (one
   head call for the candidates of all concurrent requests, like step 3),
   and return the best ``k``.

A history with no known item gets the popularity fallback, flagged in the response.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from functools import partial

import numpy as np
from starlette.concurrency import run_in_threadpool

from service.batching import MicroBatcher
from service.bundle import Bundle, Retriever
from service.cache import BehaviourCache, CachedRetrieval, history_digest
from service.errors import StoreUnavailable, UnknownEncoder
from service.histories import left_padded_window
from service.ranking import RerankJob, rerank_batch

LOG = logging.getLogger(__name__)


@dataclass
class Recommendation:
    """What ``/recommend`` returns, before serialisation."""

    items: list[dict]
    bundle: str
    encoder: str
    reranked: bool = False
    cache: str = "bypass"  # hit, miss or bypass
    fallback: str | None = None
    unknown_items: int = 0
    history_truncated: bool = False
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class PreparedHistory:
    item_ids: np.ndarray  # (n,) internal ids of known items, oldest first
    timestamps: np.ndarray  # (n,) int64
    unknown: int
    truncated: bool


def prepare_history(bundle: Bundle, events: list[tuple[str, int]], cap: int) -> PreparedHistory:
    """Known events ordered by time (stable), the newest ``cap`` of them."""
    raw = [item for item, _ in events]
    stamps = np.fromiter((ts for _, ts in events), dtype=np.int64, count=len(events))
    ids = bundle.catalogue.internal_ids(raw)
    order = np.argsort(stamps, kind="stable")
    ids, stamps = ids[order], stamps[order]
    known = ids > 0
    unknown = int((~known).sum())
    ids, stamps = ids[known], stamps[known]
    truncated = len(ids) > cap  # only dropped known events truncate what the encoder sees
    if truncated:
        ids, stamps = ids[-cap:], stamps[-cap:]
    return PreparedHistory(ids, stamps, unknown, truncated)


class Recommender:
    """Runs the pipeline for one bundle; a reload swaps in a new Recommender."""

    def __init__(
        self,
        bundle: Bundle,
        default_encoder: str | None = None,
        max_batch: int = 32,
        max_wait_ms: float = 0.0,
        on_batch=None,
    ):
        self.bundle = bundle
        self.default_encoder = default_encoder or bundle.default_encoder
        # One batcher per retriever: its requests share an ONNX call and a faiss search,
        # and (where the retriever has a CTR head) one head call for all their candidates.
        self.batchers = {
            name: MicroBatcher(
                partial(encode_and_search, retriever), max_batch, max_wait_ms, on_batch
            )
            for name, retriever in bundle.retrievers.items()
        }
        self.rerankers = {
            name: MicroBatcher(
                partial(
                    rerank_batch,
                    retriever.ctr_head,
                    bundle.item_features,
                    retriever.item_vectors,
                ),
                max_batch,
                max_wait_ms,
            )
            for name, retriever in bundle.retrievers.items()
            if retriever.ctr_head is not None and bundle.item_features is not None
        }
        # Cache writes run behind the response; a lookup of a key still being written
        # waits for it, so a repeat request on this worker always finds its entry.
        self._writes: dict[CacheKey, asyncio.Task] = {}
        popularity = bundle.catalogue.popularity.astype(np.float64)
        popularity[0] = -np.inf
        self._popular_order = np.argsort(-popularity, kind="stable")

    def retriever(self, encoder: str | None) -> Retriever:
        name = encoder or self.default_encoder
        if name not in self.bundle.retrievers:
            raise UnknownEncoder(
                f"encoder {name!r} is not in bundle {self.bundle.name} "
                f"(available: {', '.join(self.bundle.retrievers)})"
            )
        return self.bundle.retrievers[name]

    def _item(self, item_id: int, score: float, retrieval_score: float) -> dict:
        titles = self.bundle.catalogue.titles
        entry = {
            "item_id": str(self.bundle.catalogue.raw_ids[item_id]),
            "score": float(score),
            "retrieval_score": float(retrieval_score),
        }
        if titles is not None and titles[item_id] is not None:
            entry["title"] = titles[item_id]
        return entry

    def popular(self, k: int, exclude: np.ndarray) -> list[dict]:
        """The ``k`` most popular items not in ``exclude``, scored by log count."""
        counts = self.bundle.catalogue.popularity
        chosen = []
        excluded = set(exclude.tolist())
        for item in self._popular_order:
            if item == 0 or item in excluded:
                continue
            chosen.append(item)
            if len(chosen) == k:
                break
        return [self._item(i, np.log1p(counts[i]), np.log1p(counts[i])) for i in chosen]

    async def recommend(
        self,
        events: list[tuple[str, int]],
        *,
        k: int,
        encoder: str | None,
        exclude_seen: bool,
        candidates: int,
        rerank: bool,
        cache: BehaviourCache | None,
        history_cap: int,
    ) -> Recommendation:
        started = time.perf_counter()
        retriever = self.retriever(encoder)
        history = prepare_history(self.bundle, events, history_cap)
        result = Recommendation(
            items=[],
            bundle=self.bundle.name,
            encoder=retriever.name,
            unknown_items=history.unknown,
            history_truncated=history.truncated,
        )
        timings = {"encode": 0.0, "retrieve": 0.0, "rerank": 0.0}
        if len(history.item_ids) == 0:
            result.fallback = "popularity"
            result.items = self.popular(k, history.item_ids)
            result.timings_ms = {**timings, "total": _ms(started)}
            return result

        ids, deltas = left_padded_window(
            history.item_ids,
            history.timestamps,
            np.array([0]),
            np.array([len(history.item_ids)]),
            retriever.max_len,
        )
        seen = np.unique(history.item_ids) if exclude_seen else np.zeros(0, np.int64)
        depth = min(self.bundle.catalogue.n_items, max(candidates, k) + len(seen))
        key = (self.bundle.name, retriever.name, history_digest(ids, deltas))

        writing = self._writes.get(key)
        if writing is not None:
            await asyncio.shield(writing)
        cached = await _cache_get(cache, key)
        result.cache = "bypass" if cache is None or cached is False else "miss"
        if cached and len(cached.ids) >= depth:
            result.cache = "hit"
            found_ids, found_scores = cached.ids[:depth], cached.scores[:depth]
            embedding = cached.embedding
        else:
            job = RetrievalJob(ids, deltas, depth, cached.embedding if cached else None)
            embedding, found_scores, found_ids, took = await self.batchers[retriever.name].submit(
                job
            )
            timings["encode"], timings["retrieve"] = took
            if result.cache == "miss":
                self._write_behind(
                    cache, key, CachedRetrieval(embedding, found_ids, found_scores)
                )

        keep = (found_ids > 0) & ~np.isin(found_ids, seen)
        found_ids, found_scores = found_ids[keep], found_scores[keep]
        found_ids, found_scores = (
            found_ids[: max(candidates, k)],
            found_scores[: max(candidates, k)],
        )
        reranker = self.rerankers.get(retriever.name) if rerank else None
        if reranker is not None and len(found_ids):
            reranking = time.perf_counter()
            ranked = await reranker.submit(
                RerankJob(
                    embedding,
                    found_ids,
                    found_scores,
                    history.item_ids,
                    history.timestamps,
                    int(time.time()),
                )
            )
            timings["rerank"] = _ms(reranking)
            result.reranked = True
            result.items = [
                self._item(i, s, r)
                for i, s, r in zip(
                    ranked.ids[:k], ranked.logits[:k], ranked.retrieval_scores[:k], strict=True
                )
            ]
        else:
            result.items = [
                self._item(i, s, s) for i, s in zip(found_ids[:k], found_scores[:k], strict=True)
            ]
        result.timings_ms = {**timings, "total": _ms(started)}
        return result

    def _write_behind(self, cache: BehaviourCache, key: CacheKey, value: CachedRetrieval) -> None:
        """Store an entry without making the request wait for Redis's answer."""
        task = asyncio.create_task(_cache_put(cache, key, value))
        self._writes[key] = task

        def forget(done: asyncio.Task) -> None:
            if self._writes.get(key) is done:
                del self._writes[key]

        task.add_done_callback(forget)

    async def drain(self) -> None:
        """Wait for the cache writes still in flight (before the cache is closed)."""
        if self._writes:
            await asyncio.gather(*self._writes.values(), return_exceptions=True)

    async def similar(self, item_id: str, k: int, encoder: str | None) -> list[dict] | None:
        """Items nearest to ``item_id`` in the retriever's item space (None: unknown item)."""
        retriever = self.retriever(encoder)
        internal = self.bundle.catalogue.lookup.get(item_id)
        if internal is None:
            return None
        query = np.asarray(retriever.item_vectors[internal], dtype=np.float32)[None]
        scores, ids = await run_in_threadpool(retriever.index.search, query, k + 1)
        pairs = [(i, s) for i, s in zip(ids[0], scores[0], strict=True) if i not in (0, internal)]
        return [self._item(i, s, s) for i, s in pairs[:k]]


@dataclass
class RetrievalJob:
    """One request's share of a batched encode + search."""

    ids: np.ndarray  # (1, L) encoder window
    deltas: np.ndarray  # (1, L)
    depth: int
    embedding: np.ndarray | None = None  # (d,) when the cache already had it


def encode_and_search(
    retriever: Retriever, jobs: list[RetrievalJob]
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float]]]:
    """One ONNX call for every job without an embedding and one index search for all.

    Windows of different lengths are left-padded to the longest, which changes no
    embedding (encoders are padding-invariant, a test checks it). Returns per job the
    embedding, scores and ids to its depth, and the shared (encode, retrieve) milliseconds.
    """
    started = time.perf_counter()
    embeddings = [job.embedding for job in jobs]
    missing = [i for i, e in enumerate(embeddings) if e is None]
    if missing:
        width = max(jobs[i].ids.shape[1] for i in missing)
        ids = np.zeros((len(missing), width), dtype=np.int64)
        deltas = np.zeros((len(missing), width), dtype=np.float32)
        for row, i in enumerate(missing):
            length = jobs[i].ids.shape[1]
            ids[row, width - length :] = jobs[i].ids[0]
            deltas[row, width - length :] = jobs[i].deltas[0]
        for row, vector in zip(missing, retriever.encoder.encode(ids, deltas), strict=True):
            embeddings[row] = vector
    encoded = time.perf_counter()
    depth = max(job.depth for job in jobs)
    scores, found = retriever.index.search(np.stack(embeddings), depth)
    took = (_ms(started, encoded), _ms(encoded))
    return [
        (embeddings[i], scores[i, : job.depth], found[i, : job.depth], took)
        for i, job in enumerate(jobs)
    ]


CacheKey = tuple[str, str, str]  # bundle, encoder, history digest


async def _cache_get(cache: BehaviourCache | None, key: CacheKey) -> CachedRetrieval | None | bool:
    """The cached entry, None on a miss, False when the cache cannot be reached."""
    if cache is None:
        return False
    try:
        return await cache.get_retrieval(cache.retrieval_key(*key))
    except StoreUnavailable:
        return False


async def _cache_put(cache: BehaviourCache | None, key: CacheKey, value: CachedRetrieval) -> bool:
    """Store an entry; False when the cache cannot be reached (the answer is still served)."""
    if cache is None:
        return False
    try:
        await cache.put_retrieval(cache.retrieval_key(*key), value)
        return True
    except StoreUnavailable:
        return False


def _ms(start: float, end: float | None = None) -> float:
    return ((end if end is not None else time.perf_counter()) - start) * 1000.0

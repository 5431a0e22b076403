"""The recommendation pipeline: history -> user embedding -> candidates -> (rerank) -> top k.

A request joins its retriever's micro-batch, and the batch goes through these steps:

1. for all its requests at once: map raw item ids to the bundle's ids (unknown ids are
   counted, not fatal), order each history by time and keep its most recent
   ``request_history_cap`` events, build the encoder input windows
   (``service.histories``) and their digests, the keys of the requests' entries in the
   behaviour cache;
2. read all those entries in one Redis round trip (a hit skips encoding and retrieval);
3. where the compute backend runs it (``service.compute``: a child process, or a thread):
   encode the misses with one ONNX call, search the index once for all of them, remove
   each request's seen items and rerank every request's candidates with one CTR head call
   (where the bundle has a head);
4. write the new entries behind the answers, in one pipeline (a repeat that arrives before
   they land is served from memory), and return each request's best ``k``, timed per
   stage (each stage's time is its batch's).

Per request, the event loop only parses, queues and answers: everything per event or per
candidate runs once per batch, in numpy or in the native libraries, so that the Python
work that holds the GIL, which bounds the throughput of a worker, is amortised. Several
batches can be in flight: one computing while the next ones are prepared and read.

A history with no known item gets the popularity fallback, flagged in the response.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import marshal
import time
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np
from cachetools import TTLCache

from service.batching import MicroBatcher
from service.bundle import Bundle, Catalogue, Retriever
from service.cache import BehaviourCache, CachedRetrieval, history_digest
from service.compute import ProcessCompute, ThreadCompute
from service.errors import StoreUnavailable, UnknownEncoder
from service.features import ItemFeatures
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
    cache: str = "bypass"  # hit, miss, bypass, or answer (reused whole from the answer memo)
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


def prepare_histories(
    catalogue: Catalogue, histories: list[list[tuple[str, int]]], caps: list[int]
) -> list[PreparedHistory]:
    """Each history's known events ordered by time (stable), the newest ``cap`` of them;
    one pass over all events of all histories."""
    lengths = np.fromiter((len(events) for events in histories), np.int64, len(histories))
    total = int(lengths.sum())
    ids = catalogue.internal_ids([item for events in histories for item, _ in events])
    stamps = np.fromiter((ts for events in histories for _, ts in events), np.int64, total)
    owner = np.repeat(np.arange(len(histories)), lengths)
    order = np.lexsort((stamps, owner))  # by history, then time; ties keep their order
    ids, stamps, owner = ids[order], stamps[order], owner[order]
    known = ids > 0
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
        PreparedHistory(ids[a:b], stamps[a:b], int(u), bool(n > cap))
        for a, b, u, n, cap in zip(starts, ends, unknown, counts, caps_of, strict=True)
    ]


def prepare_history(bundle: Bundle, events: list[tuple[str, int]], cap: int) -> PreparedHistory:
    """One history's known events ordered by time (stable), the newest ``cap`` of them."""
    return prepare_histories(bundle.catalogue, [events], [cap])[0]


@dataclass
class RetrievalJob:
    """One request's share of a batched encode + search."""

    ids: np.ndarray  # (1, L) encoder window
    deltas: np.ndarray  # (1, L)
    depth: int
    embedding: np.ndarray | None = None  # (d,) when the cache already had it


@dataclass
class ComputeJob:
    """What the computation needs of one request (all of it goes to a compute process)."""

    history_ids: np.ndarray  # (n,) known events, oldest first
    history_ts: np.ndarray  # (n,)
    retrieval: RetrievalJob
    seen: np.ndarray  # ids never to serve (empty unless exclude_seen)
    keep: int  # candidates kept after exclusion: max(candidates, k)
    k: int
    rerank: bool
    request_time: int
    cached: CachedRetrieval | None = None  # a cache hit: no encoding, no search


@dataclass
class Job:
    """One request inside a pipeline batch: what it asks, then what its batch found."""

    events: list[tuple[str, int]]
    history_cap: int
    exclude_seen: bool
    keep: int
    k: int
    rerank: bool
    request_time: int
    cache: BehaviourCache | None
    history: PreparedHistory | None = None
    work: ComputeJob | None = None  # None: no known item, the popularity fallback
    key: str | None = None  # the request's cache entry (None without a cache)
    outcome: str = "bypass"  # hit, miss or bypass


@dataclass
class Answer:
    """A job's result: the entry to cache (None for a hit or the fallback) and the ranked
    top k."""

    entry: CachedRetrieval | None
    ids: np.ndarray  # (<= k,) best first
    scores: np.ndarray  # the served score: the head's logit, or the retrieval score
    retrieval_scores: np.ndarray
    reranked: bool
    timings: dict[str, float]
    items: list[dict] = field(default_factory=list)


class Recommender:
    """Runs the pipeline for one bundle; a reload swaps in a new Recommender."""

    def __init__(
        self,
        bundle: Bundle,
        default_encoder: str | None = None,
        max_batch: int = 32,
        max_wait_ms: float = 0.0,
        on_batch=None,
        compute: ThreadCompute | ProcessCompute | None = None,
        in_flight: int = 4,
        answers: TTLCache | None = None,
    ):
        self.bundle = bundle
        # Recent answers by request, when configured (RECSERVE_ANSWER_TTL_SECONDS): an
        # identical request (same events, same parameters) within the TTL gets the same
        # ranked list without a batch. Any change to the history changes the key, so an
        # answer never outlives the history it was computed from; what can age, by at most
        # the TTL, is the request time behind the head's time features. Per recommender,
        # so a reload starts empty; keys are digests and the budget is counted in items,
        # so neither long histories nor a large k can make it grow unbounded.
        self.answers = answers
        self.default_encoder = default_encoder or bundle.default_encoder
        # Where batches are computed (service.compute); by default a thread of the loop's.
        self.compute = compute or ThreadCompute(bundle)
        # One batcher per retriever: its requests share a cache read, an ONNX call, a faiss
        # search and a head call.
        self.pipelines = {
            name: MicroBatcher(
                partial(self._run_batch, retriever), max_batch, max_wait_ms, on_batch, in_flight
            )
            for name, retriever in bundle.retrievers.items()
        }
        # Entries whose write is still in flight, served from here to a repeat request
        # that arrives before Redis has them: (cache, key) -> entry.
        self._unwritten: dict[tuple[BehaviourCache, str], CachedRetrieval] = {}
        self._writes: set[asyncio.Task] = set()
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

    def items(self, ids: np.ndarray, scores: np.ndarray, retrieval_scores: np.ndarray):
        """Response items for internal ids, best first."""
        catalogue = self.bundle.catalogue
        titles = catalogue.titles
        return [
            {
                "item_id": str(raw),
                "score": score,
                "retrieval_score": retrieval_score,
                "title": titles[i] if titles is not None else None,
            }
            for raw, score, retrieval_score, i in zip(
                catalogue.raw_ids[ids].tolist(),
                np.asarray(scores, dtype=np.float64).tolist(),
                np.asarray(retrieval_scores, dtype=np.float64).tolist(),
                ids.tolist(),
                strict=True,
            )
        ]

    def popular(self, k: int, exclude: np.ndarray) -> list[dict]:
        """The ``k`` most popular items not in ``exclude``, scored by log count."""
        chosen = []
        excluded = set(exclude.tolist())
        for item in self._popular_order:
            if item == 0 or item in excluded:
                continue
            chosen.append(item)
            if len(chosen) == k:
                break
        chosen = np.asarray(chosen, dtype=np.int64)
        scores = np.log1p(self.bundle.catalogue.popularity[chosen])
        return self.items(chosen, scores, scores)

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
        keep = max(candidates, k)
        asked = None
        if self.answers is not None:
            asked = request_digest(
                events, (retriever.name, k, keep, exclude_seen, rerank, history_cap)
            )
            reused = self.answers.get(asked)
            if reused is not None:
                # The reused answer is shared: never mutated, only copied with new fields.
                return replace(
                    reused,
                    cache="answer",
                    timings_ms={
                        "encode": 0.0,
                        "retrieve": 0.0,
                        "rerank": 0.0,
                        "total": _ms(started),
                    },
                )
        job = Job(
            events=events,
            history_cap=history_cap,
            exclude_seen=exclude_seen,
            keep=keep,
            k=k,
            rerank=rerank,
            request_time=int(time.time()),
            cache=cache,
        )
        answer = await self.pipelines[retriever.name].submit(job)
        recommendation = Recommendation(
            items=answer.items,
            bundle=self.bundle.name,
            encoder=retriever.name,
            reranked=answer.reranked,
            cache=job.outcome,
            fallback=None if job.work is not None else "popularity",
            unknown_items=job.history.unknown,
            history_truncated=job.history.truncated,
            timings_ms={**answer.timings, "total": _ms(started)},
        )
        if asked is not None:
            self.answers[asked] = recommendation
        return recommendation

    async def start(self) -> None:
        """Start where batches are computed (a compute process loads its models here)."""
        await self.compute.start()

    async def close(self, grace_seconds: float = 5.0) -> None:
        """Stop once the batches in flight are answered and the writes have landed
        (requests that took this recommender just before a reload still finish)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_seconds
        while any(p.busy for p in self.pipelines.values()) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for pipeline in self.pipelines.values():
            await pipeline.close()
        await self.drain()
        await self.compute.close()

    async def _run_batch(self, retriever: Retriever, jobs: list[Job]) -> list[Answer]:
        """History preparation and the cache read for the batch, the computation where the
        compute backend runs it, the writes behind the answers."""
        self._prepare(retriever, jobs)
        served = [job for job in jobs if job.work is not None]
        if served:
            await self._look_up(served)
            computed = iter(await self.compute.batch(retriever.name, [job.work for job in served]))
        written: dict[BehaviourCache, list[tuple[str, CachedRetrieval]]] = {}
        answers = []
        for job in jobs:
            if job.work is None:  # no known item: the popularity fallback
                answers.append(self._fallback(job))
                continue
            answer = next(computed)
            answer.items = self.items(answer.ids, answer.scores, answer.retrieval_scores)
            answers.append(answer)
            if job.outcome == "miss":
                written.setdefault(job.cache, []).append((job.key, answer.entry))
        for cache, entries in written.items():
            self._write_behind(cache, entries)
        return answers

    def _prepare(self, retriever: Retriever, jobs: list[Job]) -> None:
        """Histories, encoder windows, cache keys and seen items of a batch, in one pass."""
        histories = prepare_histories(
            self.bundle.catalogue, [job.events for job in jobs], [job.history_cap for job in jobs]
        )
        for job, history in zip(jobs, histories, strict=True):
            job.history = history
        usable = [job for job in jobs if len(job.history.item_ids)]
        if not usable:
            return
        lengths = np.array([len(job.history.item_ids) for job in usable])
        ends = np.cumsum(lengths)
        item_ids = np.concatenate([job.history.item_ids for job in usable])
        ids, deltas = left_padded_window(
            item_ids,
            np.concatenate([job.history.timestamps for job in usable]),
            ends - lengths,
            ends,
            retriever.max_len,
        )
        # The distinct items of every history, from one sort of (request, item) keys.
        span = self.bundle.catalogue.n_items + 1
        distinct = np.unique(np.repeat(np.arange(len(usable)), lengths) * span + item_ids)
        bounds = np.searchsorted(distinct, np.arange(len(usable) + 1) * span)
        for row, (job, length) in enumerate(zip(usable, lengths.tolist(), strict=True)):
            # Each window is cut to its own width, exactly as it would be encoded alone, so
            # its digest does not depend on the batch it came in.
            width = min(retriever.max_len, length)
            window, gaps = ids[row : row + 1, -width:], deltas[row : row + 1, -width:]
            seen = distinct[bounds[row] : bounds[row + 1]] - row * span
            if not job.exclude_seen:
                seen = seen[:0]
            depth = min(self.bundle.catalogue.n_items, job.keep + len(seen))
            job.work = ComputeJob(
                history_ids=job.history.item_ids,
                history_ts=job.history.timestamps,
                retrieval=RetrievalJob(window, gaps, depth),
                seen=seen,
                keep=job.keep,
                k=job.k,
                rerank=job.rerank,
                request_time=job.request_time,
            )
            if job.cache is not None:
                job.key = job.cache.retrieval_key(
                    self.bundle.name, retriever.name, history_digest(window, gaps)
                )

    def _fallback(self, job: Job) -> Answer:
        empty = np.zeros(0, dtype=np.int64)
        return Answer(
            entry=None,
            ids=empty,
            scores=empty,
            retrieval_scores=empty,
            reranked=False,
            timings={"encode": 0.0, "retrieve": 0.0, "rerank": 0.0},
            items=self.popular(job.k, job.history.item_ids),
        )

    async def _look_up(self, jobs: list[Job]) -> None:
        """Set each job's cached entry and outcome; one read per cache for the batch."""
        asking: dict[BehaviourCache, list[Job]] = {}
        for job in jobs:
            if job.cache is None:
                continue
            unwritten = self._unwritten.get((job.cache, job.key))
            if unwritten is not None:
                _use(job, unwritten)
            else:
                asking.setdefault(job.cache, []).append(job)
        for cache, group in asking.items():
            try:
                found = await cache.get_retrievals([job.key for job in group])
            except StoreUnavailable:
                continue  # bypass: the answer is computed as if there were no cache
            for job, entry in zip(group, found, strict=True):
                _use(job, entry)

    def _write_behind(self, cache: BehaviourCache, entries: list[tuple[str, CachedRetrieval]]):
        """Store a batch's new entries without making its requests wait for Redis."""
        for key, value in entries:
            self._unwritten[(cache, key)] = value
        task = asyncio.create_task(_cache_put(cache, entries))
        self._writes.add(task)

        def forget(done: asyncio.Task) -> None:
            self._writes.discard(done)
            for key, value in entries:
                if self._unwritten.get((cache, key)) is value:
                    del self._unwritten[(cache, key)]

        task.add_done_callback(forget)

    async def drain(self) -> None:
        """Wait for the cache writes still in flight (before the cache is closed)."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    async def similar(self, item_id: str, k: int, encoder: str | None) -> list[dict] | None:
        """Items nearest to ``item_id`` in the retriever's item space (None: unknown item)."""
        retriever = self.retriever(encoder)
        internal = self.bundle.catalogue.lookup.get(item_id)
        if internal is None:
            return None
        query = np.asarray(retriever.item_vectors[internal], dtype=np.float32)[None]
        scores, ids = await self.compute.search(retriever.name, query, k + 1)
        keep = (ids[0] != 0) & (ids[0] != internal)
        return self.items(ids[0][keep][:k], scores[0][keep][:k], scores[0][keep][:k])


def request_digest(events: list[tuple[str, int]], parameters: tuple) -> bytes:
    """A 160-bit digest of exactly what an answer depends on besides the request time: the
    events as sent and the request's parameters. A digest rather than the events
    themselves keys the answer memo, so a long history costs it 20 bytes. marshal writes
    strings, ints and tuples unambiguously (what it writes reads back to the same value)
    and five times faster than repr; format 2, because later ones write back-references
    that depend on reference counts, so equal events could serialise differently."""
    return hashlib.blake2b(marshal.dumps((parameters, events), 2), digest_size=20).digest()


def answer_size(recommendation: Recommendation) -> int:
    """What an answer counts against the memo's budget: its items (at least one)."""
    return max(1, len(recommendation.items))


def _use(job: Job, entry: CachedRetrieval | None) -> None:
    """A found entry deep enough is a hit; a shallower one still saves the encoding."""
    job.outcome = "miss"
    if entry is None:
        return
    if len(entry.ids) >= job.work.retrieval.depth:
        job.outcome = "hit"
        job.work.cached = entry
    else:
        job.work.retrieval.embedding = entry.embedding


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


def compute_batch(
    retriever: Retriever, item_features: ItemFeatures | None, jobs: list[ComputeJob]
) -> list[Answer]:
    """Everything but the cache for a batch of requests, in one thread: encode and search
    the misses together, drop each request's seen items, rerank all with one head call."""
    entries: list[CachedRetrieval | None] = [job.cached for job in jobs]
    timings = {"encode": 0.0, "retrieve": 0.0, "rerank": 0.0}
    misses = [i for i, entry in enumerate(entries) if entry is None]
    if misses:
        found = encode_and_search(retriever, [jobs[i].retrieval for i in misses])
        for i, (embedding, scores, ids, _) in zip(misses, found, strict=True):
            entries[i] = CachedRetrieval(embedding, ids, scores)
        timings["encode"], timings["retrieve"] = found[0][3]
    kept = _without_seen(jobs, entries, retriever.index.n_items + 1)

    ranked: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    head = retriever.ctr_head if item_features is not None else None
    wanted = [
        i for i, job in enumerate(jobs) if job.rerank and head is not None and len(kept[i][0])
    ]
    if wanted:
        started = time.perf_counter()
        reranked = rerank_batch(
            head,
            item_features,
            retriever.item_vectors,
            [
                RerankJob(
                    entries[i].embedding,
                    kept[i][0],
                    kept[i][1],
                    jobs[i].history_ids,
                    jobs[i].history_ts,
                    jobs[i].request_time,
                )
                for i in wanted
            ],
        )
        timings["rerank"] = _ms(started)
        for i, result in zip(wanted, reranked, strict=True):
            ranked[i] = (result.ids, result.logits, result.retrieval_scores)
    answers = []
    for i, job in enumerate(jobs):
        ids, scores, retrieval_scores = ranked.get(i, (kept[i][0], kept[i][1], kept[i][1]))
        answers.append(
            Answer(
                # Only a new entry travels back (a hit's is the caller's already).
                entry=entries[i] if job.cached is None else None,
                ids=ids[: job.k],
                scores=scores[: job.k],
                retrieval_scores=retrieval_scores[: job.k],
                reranked=i in ranked,
                timings=timings,
            )
        )
    return answers


def _without_seen(
    jobs: list[ComputeJob], entries: list[CachedRetrieval], span: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each job's candidates to its depth without padding and seen items, the first
    ``keep`` of them; one membership test for the whole batch (ids are below ``span``)."""
    ids = [entry.ids[: job.retrieval.depth] for job, entry in zip(jobs, entries, strict=True)]
    lengths = np.array([len(found) for found in ids])
    flat = np.concatenate(ids)
    owner = np.repeat(np.arange(len(jobs)), lengths)
    seen = np.concatenate([job.seen + row * span for row, job in enumerate(jobs)])
    keep = (flat > 0) & ~np.isin(owner * span + flat, seen)
    ends = np.cumsum(lengths)
    kept = []
    for row, (job, entry) in enumerate(zip(jobs, entries, strict=True)):
        mine = keep[ends[row] - lengths[row] : ends[row]]
        depth = job.retrieval.depth
        kept.append((ids[row][mine][: job.keep], entry.scores[:depth][mine][: job.keep]))
    return kept


async def _cache_put(cache: BehaviourCache, entries: list[tuple[str, CachedRetrieval]]) -> bool:
    """Store entries; False when the cache cannot be reached (the answers are still served)."""
    # One turn of the loop first: the batch's requests, woken in this same turn, send their
    # answers before the write spends its CPU.
    await asyncio.sleep(0)
    try:
        await cache.put_retrievals(entries)
        return True
    except StoreUnavailable:
        return False


def _ms(start: float, end: float | None = None) -> float:
    return ((end if end is not None else time.perf_counter()) - start) * 1000.0

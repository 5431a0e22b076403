"""The async orchestration of /recommend: answer memo, micro-batches, the behaviour cache.

A request joins its retriever's micro-batch (``service.batching``), and the batch goes:

1. ``service.pipeline.prepare_queries`` for all its requests at once (histories, encoder
   windows, search depths, seen items), then the keys of their entries in the behaviour
   cache (a digest of each encoder window; an entry is the unfiltered retrieval, so
   requests with any filter share it);
2. one Redis round trip reads all those entries (a hit skips encoding and retrieval; an
   entry too shallow still saves the encoding);
3. ``service.pipeline.compute_batch`` where ``service.compute`` runs it (a child process
   or a thread): encode, search, drop seen items and what the filter leaves out (searching
   the eligible items where too few are left), rerank.

   When nothing else is computing and recent reads mostly missed, steps 2 and 3 overlap
   instead: the batch is computed whole while its entries are read, so a lone request
   does not wait a Redis round trip before its computation starts. The compute would be
   idle otherwise, so what a hit computed in vain costs no other request; the entries
   read still decide hit or miss (what is written, what is reported), and a hit is
   served from its entry as ever;
4. the new entries are written behind the answers, coalesced across batches
   (``service.write_behind``; a repeat that arrives before they land is served from
   memory), and each request gets its best ``k``.

Per request, the event loop only parses, queues and answers. Several batches can be in
flight: one computing while the next ones are prepared and read. A history with no known
item gets the popularity fallback, flagged in the response; the fallback and
/items/{id}/similar honour the request's filter as the kernel does.

With ``RECSERVE_ANSWER_TTL_SECONDS`` a per-worker memo returns the whole answer to an
identical request (same events, same parameters, same filter, same catalogue version)
within the TTL without a batch.

The catalogue API's writes reach a recommender as changes (:meth:`Recommender.apply_catalogue`):
it serves the new ``service.live_catalogue.ServedCatalogue`` from the next batch on, and
its compute backend (a compute process builds its own, with the added items' vectors).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import marshal
import time
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np
from cachetools import TTLCache
from starlette.concurrency import run_in_threadpool

from service.batching import MicroBatcher
from service.bundle import Bundle, Retriever
from service.cache import BehaviourCache, CachedRetrieval, history_digest
from service.catalogue import ItemFilter, ItemRecord
from service.compute import LoneInWorker, ProcessCompute, ThreadCompute
from service.errors import InvalidField, StoreUnavailable, UnknownEncoder, excerpt
from service.filters import drop_excluded, filtered_depth
from service.live_catalogue import CatalogueChange, ServedCatalogue
from service.pipeline import (
    DEEPENING,
    STAGES,
    Query,
    RankingRequest,
    elapsed_ms,
    prepare_queries,
    similar_query,
)
from service.settings import Settings
from service.write_behind import WriteBehind

CACHE_WRITES_QUEUED = 10_000  # new cache entries awaiting Redis; more are not cached
# Overlap the cache read with the computation while the share of recent reads that hit is
# below this (an average over about HIT_SHARE_SPAN requests).
SPECULATE_BELOW_HIT_SHARE = 0.5
HIT_SHARE_SPAN = 20

_DEFAULTS = {name: info.default for name, info in Settings.model_fields.items()}


@dataclass
class Recommendation:
    """What ``/recommend`` (and ``/items/{id}/similar``) returns, before serialisation."""

    items: list[dict]
    bundle: str
    encoder: str
    reranked: bool = False
    cache: str = "bypass"  # hit, miss, bypass, or answer (reused whole from the answer memo)
    fallback: str | None = None
    unknown_items: int = 0
    history_truncated: bool = False
    timings_ms: dict[str, float] = field(default_factory=dict)
    filtered: int = 0  # candidates the filter removed (service.filters.drop_excluded)
    at: int = 0  # the request time the answer was ranked for (unix seconds)


@dataclass
class _Pending:
    """A request inside a batch: what it asks, and what its batch has found so far."""

    request: RankingRequest
    cache: BehaviourCache | None
    query: Query | None = None  # None: no known item, the popularity fallback
    key: str | None = None  # its behaviour-cache entry (None without a cache)
    outcome: str = "bypass"  # hit, miss or bypass


def answer_memo(settings: Settings) -> TTLCache | None:
    """A fresh memo of whole answers when RECSERVE_ANSWER_TTL_SECONDS is set, else None.

    Any change to the history changes the key, so an answer never outlives the history
    it was computed from; what can age, by at most the TTL, is the request time behind
    the head's time features. The budget is counted in items (see :func:`answer_size`),
    so neither long histories nor a large k can make it grow unbounded.
    """
    if settings.answer_ttl_seconds <= 0:
        return None
    return TTLCache(
        settings.answer_cache_items, settings.answer_ttl_seconds, time.monotonic, answer_size
    )


class Recommender:
    """Serves one bundle; a reload swaps in a new Recommender."""

    def __init__(
        self,
        bundle: Bundle,
        *,
        default_encoder: str | None = None,
        max_batch: int = _DEFAULTS["max_batch"],
        max_wait_ms: float = _DEFAULTS["batch_wait_ms"],
        in_flight: int = _DEFAULTS["batches_in_flight"],
        compute: ThreadCompute | ProcessCompute | LoneInWorker | None = None,
        answers: TTLCache | None = None,
        on_batch=None,
        exposure: float = _DEFAULTS["cold_start_exposure"],
        write_linger_ms: float = _DEFAULTS["write_linger_ms"],
    ):
        self.bundle = bundle
        # The items served: the bundle's, then as the catalogue API's writes change them.
        self.served = ServedCatalogue.of_bundle(bundle)
        self.exposure = exposure
        self.default_encoder = default_encoder or bundle.default_encoder
        # Where batches are computed (service.compute); by default a thread of the loop's.
        self.compute = compute or ThreadCompute(bundle)
        # Per recommender, so a reload starts with an empty memo.
        self.answers = answers
        # One batcher per retriever: its requests share a cache read, an ONNX call, a faiss
        # search and a head call.
        self.batchers = {
            name: MicroBatcher(
                partial(self._run_batch, retriever),
                max_batch=max_batch,
                max_wait_ms=max_wait_ms,
                on_batch=on_batch,
                in_flight=in_flight,
            )
            for name, retriever in bundle.retrievers.items()
        }
        # Entries whose write is still in flight, served from here to a repeat request
        # that arrives before Redis has them: (cache, key) -> entry.
        self._unwritten: dict[tuple[BehaviourCache, str], CachedRetrieval] = {}
        self._computing = 0  # batches of this recommender in the compute backend now
        self._hit_share = 0.0  # recent reads that were hits (a moving average)
        self._writes = WriteBehind(
            self._write_entries,
            capacity=CACHE_WRITES_QUEUED,
            max_batch=max_batch,
            linger_seconds=write_linger_ms / 1000,
        )

    @classmethod
    def from_settings(
        cls,
        bundle: Bundle,
        settings: Settings,
        *,
        compute: ThreadCompute | ProcessCompute | LoneInWorker | None = None,
        on_batch=None,
    ) -> Recommender:
        """A recommender configured as the service's settings say."""
        return cls(
            bundle,
            default_encoder=settings.default_encoder,
            max_batch=settings.max_batch,
            max_wait_ms=settings.batch_wait_ms,
            in_flight=settings.batches_in_flight,
            compute=compute,
            answers=answer_memo(settings),
            on_batch=on_batch,
            exposure=settings.cold_start_exposure,
            write_linger_ms=settings.write_linger_ms,
        )

    def retriever(self, encoder: str | None) -> Retriever:
        name = encoder or self.default_encoder
        if name not in self.bundle.retrievers:
            raise UnknownEncoder(
                f"encoder {name!r} is not in bundle {self.bundle.name} "
                f"(available: {', '.join(self.bundle.retrievers)})"
            )
        return self.bundle.retrievers[name]

    def items(
        self,
        ids: np.ndarray,
        scores: np.ndarray,
        retrieval_scores: np.ndarray,
        retrieval_ranks: np.ndarray | None = None,
    ):
        """Response items for internal ids, best first; ``retrieval_ranks`` (0-based) where
        a rerank changed the order, else the items are in retrieval order."""
        catalogue = self.served.catalogue
        titles = catalogue.titles
        ranks = range(len(ids)) if retrieval_ranks is None else retrieval_ranks.tolist()
        return [
            {
                "item_id": str(raw),
                "score": score,
                "retrieval_score": retrieval_score,
                "retrieval_rank": rank + 1,
                "title": titles[i] if titles is not None else None,
            }
            for raw, score, retrieval_score, rank, i in zip(
                catalogue.raw_ids[ids].tolist(),
                np.asarray(scores, dtype=np.float64).tolist(),
                np.asarray(retrieval_scores, dtype=np.float64).tolist(),
                ranks,
                ids.tolist(),
                strict=True,
            )
        ]

    def popular(
        self, k: int, seen: np.ndarray, item_filter: ItemFilter | None = None
    ) -> tuple[list[dict], int]:
        """The ``k`` most popular items not in ``seen`` that ``item_filter`` keeps, scored
        by log count, and how many items the filter removed ahead of them.

        The popularity order is read as a retrieval: as deep as the filter needs, then
        deeper until ``k`` survive or the catalogue ends."""
        catalogue = self.served.catalogue
        excluded = catalogue.excluded(item_filter)
        eligible = catalogue.eligible(item_filter)
        order = catalogue.popularity_order
        depth = filtered_depth(k + len(seen) + len(excluded), len(order), eligible)
        while True:
            ids = order[:depth]
            (kept,), (filtered,) = drop_excluded(
                [ids],
                [ids],  # no scores to carry along: the ids stand in
                [seen],
                [k],
                excluded=[excluded],
                masks=[eligible.mask],
            )
            if len(kept[0]) == k or depth == len(order):
                break
            depth = min(len(order), depth * DEEPENING)
        chosen = kept[0]
        scores = np.log1p(catalogue.popularity[chosen])
        return self.items(chosen, scores, scores), filtered

    async def recommend(
        self,
        events: list[tuple[str, int]],
        *,
        k: int = 10,
        encoder: str | None = None,
        exclude_seen: bool = True,
        candidates: int = _DEFAULTS["candidates"],
        rerank: bool | None = None,
        cache: BehaviourCache | None = None,
        history_cap: int = _DEFAULTS["request_history_cap"],
        item_filter: ItemFilter | None = None,
        at: int | None = None,
    ) -> Recommendation:
        """The best ``k`` items after ``events`` (raw item id, unix seconds) that
        ``item_filter`` keeps (None: available items), ranked as of ``at`` (unix seconds;
        None: now), the time the CTR head's recency features measure to. ``rerank``: True
        reranks with the retriever's CTR head where it has one, False serves retrieval
        order, None the bundle's default for the retriever (``Retriever.rerank_default``).
        InvalidField for a filter on an attribute the catalogue does not have."""
        started = time.perf_counter()
        retriever = self.retriever(encoder)
        served = self.served
        # Resolved before anything is keyed on it, so that the memo holds one answer per
        # ranking actually computed: a request that leaves the choice to the bundle shares
        # the answer of one that asks for the same thing, never one that asks otherwise.
        if rerank is None:
            rerank = retriever.rerank_default
        keep = max(candidates, k)
        asked = None
        if self.answers is not None:
            shape = item_filter.key() if item_filter is not None else None
            # With the catalogue's version: no answer outlives a write it should reflect.
            asked = request_digest(
                events,
                (
                    retriever.name,
                    k,
                    keep,
                    exclude_seen,
                    rerank,
                    history_cap,
                    shape,
                    at,
                    served.version,
                ),
            )
            reused = self.answers.get(asked)
            if reused is not None:
                # The reused answer is shared: never mutated, only copied with new fields.
                timings = {**dict.fromkeys(STAGES, 0.0), "total": elapsed_ms(started)}
                return replace(reused, cache="answer", timings_ms=timings)
        # Compiled here first, so that a filter the catalogue cannot apply fails this
        # request alone, before it joins a batch.
        served.catalogue.eligible(item_filter)
        request = RankingRequest(
            events=events,
            k=k,
            keep=keep,
            exclude_seen=exclude_seen,
            rerank=rerank,
            history_cap=history_cap,
            request_time=int(time.time()) if at is None else at,
            item_filter=item_filter,
        )
        recommendation = await self.batchers[retriever.name].submit(_Pending(request, cache))
        recommendation.timings_ms["total"] = elapsed_ms(started)
        if asked is not None:
            self.answers[asked] = recommendation
        return recommendation

    async def start(self) -> None:
        """Start where batches are computed (a compute process loads its models here)."""
        await self.compute.start()

    async def apply_catalogue(self, version: int, records: dict[str, ItemRecord]) -> None:
        """Serve the catalogue API's ``records`` (raw id -> record, written up to
        ``version``) from the next batch on: the new items take the next internal ids, the
        served catalogue is rebuilt off the event loop (with the added items' vectors where
        this process computes), and the compute backend gets the change before any batch
        that could name a new id."""
        embed = self.compute.embeds
        change = CatalogueChange(version, records, self.served.assign(self.bundle, records))
        served = await run_in_threadpool(
            partial(self.served.applied, self.bundle, change, embed=embed, exposure=self.exposure)
        )
        everything = CatalogueChange(version, served.records, served.catalogue.added_lookup)
        await self.compute.update_catalogue(change, everything, served)
        self.served = served

    async def close(self, grace_seconds: float = 5.0) -> None:
        """Stop once the batches in flight are answered and the writes have landed
        (requests that took this recommender just before a reload still finish)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_seconds
        while any(b.busy for b in self.batchers.values()) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for batcher in self.batchers.values():
            await batcher.close()
        await self._writes.close(grace_seconds)  # what Redis cannot take is not cached
        await self.compute.close()

    async def _run_batch(self, retriever: Retriever, batch: list[_Pending]) -> list[Recommendation]:
        """Queries and the cache read for the batch, the computation where the compute
        backend runs it, the writes behind the answers."""
        histories, queries = prepare_queries(
            self.served.catalogue, retriever, [pending.request for pending in batch]
        )
        for pending, query in zip(batch, queries, strict=True):
            pending.query = query
            if query is not None and pending.cache is not None:
                digest = history_digest(query.window, query.deltas)
                pending.key = pending.cache.retrieval_key(self.bundle.name, retriever.name, digest)
        served = [pending for pending in batch if pending.query is not None]
        if served:
            asking = self._remembered(served)
            if asking and self._computing == 0 and self._hit_share < SPECULATE_BELOW_HIT_SHARE:
                computed = iter(await self._compute_while_reading(retriever, served, asking))
            else:
                for pending, entry in await self._read(asking):
                    _use(pending, entry)
                computed = iter(await self._compute(retriever, served))
        recommendations = []
        for pending, history in zip(batch, histories, strict=True):
            recommendation = Recommendation(
                items=[],
                bundle=self.bundle.name,
                encoder=retriever.name,
                cache=pending.outcome,
                unknown_items=history.unknown,
                history_truncated=history.truncated,
                at=pending.request.request_time,
            )
            if pending.query is None:  # no known item: the popularity fallback
                recommendation.items, recommendation.filtered = self.popular(
                    pending.request.k, history.item_ids, pending.request.item_filter
                )
                recommendation.fallback = "popularity"
                recommendation.timings_ms = dict.fromkeys(STAGES, 0.0)
            else:
                ranked = next(computed)
                recommendation.items = self.items(
                    ranked.ids, ranked.scores, ranked.retrieval_scores, ranked.retrieval_ranks
                )
                recommendation.reranked = ranked.reranked
                recommendation.timings_ms = dict(ranked.timings)
                recommendation.filtered = ranked.filtered
                if pending.outcome == "miss":
                    self._write_behind(pending.cache, pending.key, ranked.retrieval)
            recommendations.append(recommendation)
        return recommendations

    def _remembered(self, batch: list[_Pending]) -> dict[BehaviourCache, list[_Pending]]:
        """Use the entries still on their way to Redis; the rest, by cache, to be read."""
        asking: dict[BehaviourCache, list[_Pending]] = {}
        for pending in batch:
            if pending.cache is None:
                continue
            unwritten = self._unwritten.get((pending.cache, pending.key))
            if unwritten is not None:
                _use(pending, unwritten)
                self._note(pending.outcome)
            else:
                asking.setdefault(pending.cache, []).append(pending)
        return asking

    async def _read(
        self, asking: dict[BehaviourCache, list[_Pending]]
    ) -> list[tuple[_Pending, CachedRetrieval | None]]:
        """Each asking request's entry (None: not cached); one read per cache. A cache
        that cannot be reached leaves its requests out (bypass: computed as if there were
        no cache)."""
        found = []
        for cache, group in asking.items():
            try:
                entries = await cache.get_retrievals([pending.key for pending in group])
            except StoreUnavailable:
                continue
            found.extend(zip(group, entries, strict=True))
        for pending, entry in found:
            self._note(_outcome(pending, entry))
        return found

    def _note(self, outcome: str) -> None:
        """Count a looked-up request into the recent share of hits."""
        self._hit_share += ((outcome == "hit") - self._hit_share) / HIT_SHARE_SPAN

    async def _compute(self, retriever: Retriever, served: list[_Pending]) -> list:
        self._computing += 1
        try:
            return await self.compute.batch(retriever.name, [pending.query for pending in served])
        finally:
            self._computing -= 1

    async def _compute_while_reading(
        self,
        retriever: Retriever,
        served: list[_Pending],
        asking: dict[BehaviourCache, list[_Pending]],
    ) -> list:
        """The batch computed whole while its entries are read. The entries found still
        set each request's outcome, and a hit is computed again from its entry (cheap: no
        encoding, no search), so that every hit serves the cached retrieval, not one
        computed in another batch, which may differ in the last bits of its scores."""
        reading = asyncio.create_task(self._read(asking))
        try:
            computed = await self._compute(retriever, served)
        except BaseException:
            reading.cancel()
            with contextlib.suppress(BaseException):
                await reading
            raise
        hits = []
        for pending, entry in await reading:
            _use(pending, entry)
            if pending.outcome == "hit":
                hits.append(pending)
        if hits:
            again = dict(zip(map(id, hits), await self._compute(retriever, hits), strict=True))
            computed = [again.get(id(p), c) for p, c in zip(served, computed, strict=True)]
        return computed

    def _write_behind(self, cache: BehaviourCache, key: str, value: CachedRetrieval) -> None:
        """Store a new entry without making its request wait for Redis (a full queue: the
        entry is not cached)."""
        if self._writes.put((cache, key, value)):
            self._unwritten[(cache, key)] = value

    async def _write_entries(
        self, queued: list[tuple[BehaviourCache, str, CachedRetrieval]]
    ) -> None:
        """One write per cache for what queued, then the entries are Redis's to serve (a
        cache that cannot be reached stores nothing: the answers were served anyway)."""
        by_cache: dict[BehaviourCache, list[tuple[str, CachedRetrieval]]] = {}
        for cache, key, value in queued:
            by_cache.setdefault(cache, []).append((key, value))
        try:
            # One turn of the loop first: the requests just answered send their answers
            # before the write spends its CPU.
            await asyncio.sleep(0)
            for cache, entries in by_cache.items():
                with contextlib.suppress(StoreUnavailable):
                    await cache.put_retrievals(entries)
        finally:
            for cache, key, value in queued:
                if self._unwritten.get((cache, key)) is value:
                    del self._unwritten[(cache, key)]

    async def drain(self, timeout: float = 10.0) -> None:
        """Write the cache entries still queued (before the cache is closed)."""
        await self._writes.flush(timeout)

    async def similar(
        self, item_id: str, k: int, encoder: str | None, item_filter: ItemFilter | None = None
    ) -> Recommendation | None:
        """The ``k`` items nearest to ``item_id`` in the retriever's item space that
        ``item_filter`` keeps (None: unknown item), computed by the serving kernel."""
        retriever = self.retriever(encoder)
        served = self.served
        internal = served.catalogue.internal_id(item_id)
        if internal is None:
            return None
        if internal > served.catalogue.n_trained and not self.embeds(
            retriever, served.records[item_id]
        ):
            raise InvalidField(
                f"item_id: item {excerpt(item_id)} was added without a vector for retriever "
                f"{retriever.name!r}, which has no metadata encoder to derive one"
            )
        query = similar_query(served.catalogue, internal, k, item_filter)
        (ranked,) = await self.compute.batch(retriever.name, [query])
        return Recommendation(
            items=self.items(ranked.ids, ranked.scores, ranked.retrieval_scores),
            bundle=self.bundle.name,
            encoder=retriever.name,
            filtered=ranked.filtered,
        )

    def embeds(self, retriever: Retriever, record: ItemRecord) -> bool:
        """Whether ``retriever`` has a vector for added item ``record``: the writer's own
        for this bundle, or one its metadata encoder derives."""
        supplied = record.vector_for(self.bundle.name, retriever.name) is not None
        return supplied or "metadata_encoder" in retriever.paths


def request_digest(events: list[tuple[str, int]], parameters: tuple) -> bytes:
    """A 160-bit digest of exactly what an answer depends on besides the request time: the
    events as sent and the request's parameters. A digest rather than the events
    themselves keys the answer memo, so a long history costs it 20 bytes. marshal writes
    strings, ints and tuples unambiguously (what it writes reads back to the same value)
    and faster than repr (docs/BENCHMARKS.md); format 2, because later ones write
    back-references that depend on reference counts, so equal events could serialise
    differently."""
    return hashlib.blake2b(marshal.dumps((parameters, events), 2), digest_size=20).digest()


def answer_size(recommendation: Recommendation) -> int:
    """What an answer counts against the memo's budget: its items (at least one)."""
    return max(1, len(recommendation.items))


def _outcome(pending: _Pending, entry: CachedRetrieval | None) -> str:
    """A found entry deep enough is a hit; none, or a shallower one, a miss."""
    return "hit" if entry is not None and len(entry.ids) >= pending.query.depth else "miss"


def _use(pending: _Pending, entry: CachedRetrieval | None) -> None:
    """Compute from what was found: a hit from its candidates; a shallower entry still
    saves the encoding."""
    pending.outcome = _outcome(pending, entry)
    if pending.outcome == "hit":
        pending.query.cached = entry
    elif entry is not None:
        pending.query.embedding = entry.embedding

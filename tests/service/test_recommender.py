"""The pipeline on the tiny bundle: history preparation, fallback, exclusion, caching."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from cachetools import TTLCache

from service.bundle import load_bundle
from service.cache import InMemoryBehaviourCache
from service.compute import ThreadCompute
from service.errors import UnknownEncoder
from service.pipeline import prepare_histories
from service.recommender import Recommender, answer_size


@pytest.fixture(scope="module")
def bundle(exported_bundle):
    models_dir, _ = exported_bundle
    return load_bundle(models_dir, "tiny", device="cpu")


@pytest.fixture(scope="module")
def recommender(bundle):
    return Recommender(bundle)


def prepare_history(bundle, events, cap):
    """One history prepared as a batch of one."""
    return prepare_histories(bundle.catalogue, [events], [cap])[0]


def user_events(data, user: int) -> list[tuple[str, int]]:
    start, end = data.offsets[user], data.offsets[user + 1]
    return [
        (str(data.item_map.raw[i]), int(t))
        for i, t in zip(data.items[start:end], data.timestamps[start:end], strict=True)
    ]


def request_options(**options) -> dict:
    """Every keyword of Recommender.recommend, these tests' defaults overridden by ``options``."""
    return {
        "k": 10,
        "encoder": None,
        "exclude_seen": True,
        "candidates": 200,
        "rerank": False,
        "cache": None,
        "history_cap": 1000,
        **options,
    }


def recommend(recommender, events, **options):
    return asyncio.run(recommender.recommend(events, **request_options(**options)))


def ids(result) -> list[str]:
    return [item["item_id"] for item in result.items]


# --------------------------------------------------------------------------- prepare_history


def test_history_is_ordered_by_time_keeping_the_order_of_ties(bundle):
    events = [("5", 300), ("3", 100), ("9", 200), ("4", 100), ("7", 50)]
    history = prepare_history(bundle, events, cap=100)
    raw = bundle.catalogue.raw_ids[history.item_ids].tolist()
    assert raw == ["7", "3", "4", "9", "5"]
    assert history.timestamps.tolist() == [50, 100, 100, 200, 300]
    assert history.timestamps.dtype == np.int64


def test_unknown_items_are_counted_and_dropped(bundle):
    events = [("3", 1), ("no-such-item", 2), ("4", 3), ("", 4), ("also-unknown", 5)]
    history = prepare_history(bundle, events, cap=100)
    assert history.unknown == 3
    assert bundle.catalogue.raw_ids[history.item_ids].tolist() == ["3", "4"]
    assert history.timestamps.tolist() == [1, 3]
    assert not history.truncated


def test_a_long_history_keeps_the_newest_events_and_says_so(bundle):
    events = [(str(1 + n % 100), 1000 - n) for n in range(10)]  # newest first
    history = prepare_history(bundle, events, cap=4)
    assert history.truncated
    assert history.timestamps.tolist() == [997, 998, 999, 1000]
    assert bundle.catalogue.raw_ids[history.item_ids].tolist() == ["4", "3", "2", "1"]


def test_a_history_within_the_cap_is_not_truncated(bundle):
    history = prepare_history(bundle, [("1", 1), ("2", 2), ("3", 3)], cap=3)
    assert not history.truncated and len(history.item_ids) == 3


def test_unknown_items_do_not_make_a_history_truncated(bundle):
    # Five events, cap four, but only three are known: the encoder sees all of them.
    events = [("1", 1), ("x", 2), ("2", 3), ("y", 4), ("3", 5)]
    history = prepare_history(bundle, events, cap=4)
    assert len(history.item_ids) == 3 and history.unknown == 2
    assert not history.truncated


def test_an_empty_history_prepares_to_nothing(bundle):
    history = prepare_history(bundle, [], cap=10)
    assert len(history.item_ids) == 0 and history.unknown == 0 and not history.truncated


# --------------------------------------------------------------------------- recommend


def test_a_history_of_unknown_items_gets_the_popularity_fallback(recommender, bundle):
    result = recommend(recommender, [("nope", 1), ("nada", 2)], k=5)
    assert result.fallback == "popularity"
    assert result.unknown_items == 2
    popularity = bundle.catalogue.popularity
    served = [bundle.catalogue.lookup[i] for i in ids(result)]
    assert len(served) == 5
    assert popularity[served].tolist() == sorted(popularity[1:].tolist(), reverse=True)[:5]


def test_an_empty_history_gets_the_popularity_fallback(recommender):
    result = recommend(recommender, [], k=3)
    assert result.fallback == "popularity" and len(result.items) == 3
    assert result.cache == "bypass"


def test_a_known_history_is_not_a_fallback(recommender, tiny_data):
    result = recommend(recommender, user_events(tiny_data, 2))
    assert result.fallback is None
    assert result.bundle == "tiny" and result.encoder == "sasrec" and not result.reranked
    assert len(result.items) == 10
    scores = [item["score"] for item in result.items]
    assert scores == sorted(scores, reverse=True)
    assert set(result.timings_ms) == {"encode", "retrieve", "rerank", "total"}


@pytest.mark.parametrize("user", [0, 2, 5, 9])
def test_exclude_seen_never_returns_a_history_item(recommender, tiny_data, bundle, user):
    events = user_events(tiny_data, user)
    seen = {item for item, _ in events}
    everything = bundle.catalogue.n_items
    result = recommend(recommender, events, k=everything, exclude_seen=True)
    assert not seen & set(ids(result))
    assert len(result.items) == everything - len(seen)


def test_exclude_seen_false_may_return_history_items(recommender, tiny_data, bundle):
    events = user_events(tiny_data, 2)
    seen = {item for item, _ in events}
    everything = bundle.catalogue.n_items
    result = recommend(recommender, events, k=everything, exclude_seen=False)
    assert seen <= set(ids(result))
    assert len(result.items) == everything


def test_items_outside_the_encoder_window_are_still_excluded(recommender, tiny_data, bundle):
    # A history longer than max_len: the oldest items do not reach the encoder, yet they
    # were seen and must not be recommended.
    longest = int(np.argmax(tiny_data.lengths))
    events = user_events(tiny_data, longest)
    assert len(events) > bundle.retrievers["sasrec"].max_len
    seen = {item for item, _ in events}
    result = recommend(recommender, events, k=bundle.catalogue.n_items)
    assert not seen & set(ids(result))


def test_unknown_encoder_is_refused_naming_the_available_ones(recommender):
    with pytest.raises(UnknownEncoder, match="'nope'.*available: sasrec"):
        recommend(recommender, [("1", 1)], encoder="nope")


# --------------------------------------------------------------------------- caching


def test_a_repeated_history_is_a_cache_hit_with_the_same_answer(recommender, tiny_data):
    cache = InMemoryBehaviourCache()
    events = user_events(tiny_data, 2)
    first = recommend(recommender, events, cache=cache)
    second = recommend(recommender, events, cache=cache)
    assert (first.cache, second.cache) == ("miss", "hit")
    assert second.items == first.items
    assert second.timings_ms["encode"] == 0.0


def test_cached_embedding_is_not_served_after_history_changes(recommender, tiny_data):
    cache = InMemoryBehaviourCache()
    events = user_events(tiny_data, 2)
    first = recommend(recommender, events, cache=cache)
    newest = ids(first)[0]
    changed = [*events, (newest, events[-1][1] + 60)]
    second = recommend(recommender, changed, cache=cache)
    assert second.cache == "miss"
    assert newest not in ids(second)
    assert second.items == recommend(recommender, changed).items


def test_a_changed_time_gap_alone_misses_the_cache(recommender, tiny_data):
    cache = InMemoryBehaviourCache()
    events = user_events(tiny_data, 2)
    recommend(recommender, events, cache=cache)
    shifted = [*events[:-1], (events[-1][0], events[-1][1] + 3600)]
    assert recommend(recommender, shifted, cache=cache).cache == "miss"


def test_a_deeper_request_than_the_cached_one_is_answered_in_full(recommender, tiny_data):
    cache = InMemoryBehaviourCache()
    events = user_events(tiny_data, 2)
    shallow = recommend(recommender, events, cache=cache, k=3, candidates=3, exclude_seen=False)
    deep = recommend(recommender, events, cache=cache, k=50, candidates=50, exclude_seen=False)
    assert shallow.cache == "miss" and deep.cache == "miss"
    assert deep.items == recommend(recommender, events, k=50, exclude_seen=False).items
    assert ids(deep)[:3] == ids(shallow)


# --------------------------------------------------------------------------- answer memo


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def memo_recommender(bundle, ttl: float = 60.0, clock=None, items: int = 1000):
    batches: list[int] = []
    memo = TTLCache(items, ttl, clock or time.monotonic, answer_size)
    return Recommender(bundle, on_batch=batches.append, answers=memo), batches


def test_an_identical_request_reuses_the_whole_answer_without_a_batch(bundle, tiny_data):
    recommender, batches = memo_recommender(bundle)
    events = user_events(tiny_data, 2)
    first = recommend(recommender, events, rerank=True)
    second = recommend(recommender, list(events), rerank=True)
    assert (first.cache, second.cache) == ("bypass", "answer")
    assert second.items == first.items and second.reranked == first.reranked
    assert len(batches) == 1
    assert second.timings_ms["encode"] == second.timings_ms["rerank"] == 0.0
    # The memo's answer is shared, never changed by being served again.
    assert first.cache == "bypass"


def test_a_changed_history_or_request_is_never_answered_from_the_memo(bundle, tiny_data):
    recommender, batches = memo_recommender(bundle)
    plain = Recommender(bundle)
    events = user_events(tiny_data, 2)
    recommend(recommender, events)
    newest = [*events, (events[-1][0], events[-1][1] + 60)]
    variants = [
        (newest, {}),
        (events[:-1], {}),
        (events, {"k": 5}),
        (events, {"candidates": 50}),
        (events, {"exclude_seen": False}),
        (events, {"rerank": True}),
        (events, {"history_cap": 3}),
    ]
    for changed, options in variants:
        result = recommend(recommender, changed, **options)
        assert result.cache != "answer", options or "changed history"
        assert result.items == recommend(plain, changed, **options).items
    assert len(batches) == 1 + len(variants)


def test_a_reused_answer_expires_after_its_ttl(bundle, tiny_data):
    clock = Clock()
    recommender, batches = memo_recommender(bundle, ttl=10.0, clock=clock)
    events = user_events(tiny_data, 2)
    recommend(recommender, events)
    clock.now = 9.9
    assert recommend(recommender, events).cache == "answer"
    clock.now = 10.1
    assert recommend(recommender, events).cache == "bypass"
    assert len(batches) == 2


def test_the_memo_holds_at_most_its_budget_of_items(bundle, tiny_data):
    recommender, _ = memo_recommender(bundle, items=25)
    requests = [user_events(tiny_data, user) for user in (2, 3, 4)]
    for events in requests:  # ten items each: the third evicts the first
        assert len(recommend(recommender, events).items) == 10
    assert recommender.answers.currsize <= 25
    assert recommend(recommender, requests[2]).cache == "answer"
    assert recommend(recommender, requests[0]).cache == "bypass"


def test_a_long_history_costs_the_memo_a_fixed_size_key(bundle, tiny_data):
    recommender, _ = memo_recommender(bundle)
    events = user_events(tiny_data, 2) * 200
    recommend(recommender, events, history_cap=100_000)
    assert [len(key) for key in recommender.answers] == [20]
    assert recommend(recommender, events, history_cap=100_000).cache == "answer"


def test_without_a_memo_nothing_is_reused(recommender, tiny_data):
    events = user_events(tiny_data, 2)
    assert recommend(recommender, events).cache == recommend(recommender, events).cache == "bypass"


def test_an_unreachable_cache_is_bypassed_with_the_same_answer(recommender, tiny_data):
    cache = InMemoryBehaviourCache()
    cache.available = False
    events = user_events(tiny_data, 2)
    result = recommend(recommender, events, cache=cache)
    assert result.cache == "bypass"
    assert result.items == recommend(recommender, events).items


# --------------------------------------------------------------------------- similar


def test_similar_items_never_include_the_item_itself(recommender):
    items = asyncio.run(recommender.similar("1", 10, None)).items
    assert len(items) == 10 and "1" not in [item["item_id"] for item in items]


def test_similar_items_of_an_unknown_item_are_none(recommender):
    assert asyncio.run(recommender.similar("no-such-item", 10, None)) is None


class SlowWriteCache(InMemoryBehaviourCache):
    """Writes take a while, as a Redis round trip does."""

    def __init__(self):
        super().__init__()
        self.writes_done = 0

    async def put_retrievals(self, entries):
        await asyncio.sleep(0.05)
        await super().put_retrievals(entries)
        self.writes_done += 1


def test_a_miss_answers_before_its_cache_write_and_a_repeat_still_hits(bundle, tiny_data):
    recommender = Recommender(bundle)  # its own, so no other test's writes are in flight
    events = user_events(tiny_data, 4)
    cache = SlowWriteCache()

    async def scenario():
        first = await recommender.recommend(
            events, k=5, encoder=None, exclude_seen=True, candidates=50, rerank=False,
            cache=cache, history_cap=1000,
        )  # fmt: skip
        written_when_answered = cache.writes_done
        second = await recommender.recommend(
            events, k=5, encoder=None, exclude_seen=True, candidates=50, rerank=False,
            cache=cache, history_cap=1000,
        )  # fmt: skip
        await recommender.drain()
        return first, written_when_answered, second

    first, written_when_answered, second = asyncio.run(scenario())
    assert first.cache == "miss" and written_when_answered == 0  # the answer did not wait
    # The repeat came before the write landed and was served the entry being written.
    assert second.cache == "hit" and ids(second) == ids(first)
    assert cache.writes_done == 1 and len(cache.retrievals) == 1


class CountingCache(InMemoryBehaviourCache):
    def __init__(self):
        super().__init__()
        self.reads: list[int] = []
        self.writes: list[int] = []

    async def get_retrievals(self, keys):
        self.reads.append(len(keys))
        return await super().get_retrievals(keys)

    async def put_retrievals(self, entries):
        self.writes.append(len(entries))
        await super().put_retrievals(entries)


def recommend_together(recommender, histories, cache, candidates):
    """All histories at once (they share micro-batches), after which writes are drained."""

    async def scenario():
        answers = await asyncio.gather(
            *(
                recommender.recommend(
                    events,
                    k=5,
                    encoder=None,
                    exclude_seen=True,
                    candidates=candidates,
                    rerank=False,
                    cache=cache,
                    history_cap=1000,
                )
                for events in histories
            )
        )
        await recommender.drain()
        return answers

    return asyncio.run(scenario())


def test_concurrent_requests_share_one_cache_read_and_one_write(bundle, tiny_data):
    recommender = Recommender(bundle, max_batch=8, max_wait_ms=50)
    cache = CountingCache()
    histories = [user_events(tiny_data, user) for user in range(8)]
    answers = recommend_together(recommender, histories, cache, 50)
    assert cache.reads == [8] and cache.writes == [8]
    assert [a.cache for a in answers] == ["miss"] * 8
    for events, answer in zip(histories, answers, strict=True):  # each got its own answer
        assert ids(answer) == ids(recommend(Recommender(bundle), events, k=5, candidates=50))


def test_histories_prepared_together_are_each_what_they_are_alone(bundle, tiny_data):
    histories = [
        user_events(tiny_data, 1),
        [],
        [("nope", 5), ("1", 3), ("2", 3)],
        user_events(tiny_data, 3)[::-1],  # arrives newest first
        [("1", 1), ("x", 2)],
    ]
    caps = [1000, 10, 1, 7, 1000]
    together = prepare_histories(bundle.catalogue, histories, caps)
    for events, cap, batched in zip(histories, caps, together, strict=True):
        alone = prepare_history(bundle, events, cap)
        np.testing.assert_array_equal(batched.item_ids, alone.item_ids)
        np.testing.assert_array_equal(batched.timestamps, alone.timestamps)
        assert (batched.unknown, batched.truncated) == (alone.unknown, alone.truncated)
    assert together[2].truncated and len(together[2].item_ids) == 1


def test_a_request_gets_the_same_answer_and_cache_key_in_any_batch(bundle, tiny_data):
    alone_cache = CountingCache()
    batched_cache = CountingCache()
    histories = [user_events(tiny_data, user)[: 3 + user] for user in range(6)]

    alone = recommend_together(Recommender(bundle, max_batch=1), histories, alone_cache, 30)
    together = recommend_together(
        Recommender(bundle, max_batch=6, max_wait_ms=50), histories, batched_cache, 30
    )
    assert batched_cache.reads == [6] and alone_cache.reads == [1] * 6
    assert [ids(a) for a in alone] == [ids(b) for b in together]
    # Windows of different lengths share a batch, yet each key is the one it has alone.
    assert set(alone_cache.retrievals) == set(batched_cache.retrievals)


class WatchedCompute(ThreadCompute):
    """The thread backend, noting for each batch which queries came with cached candidates."""

    def __init__(self, bundle):
        super().__init__(bundle)
        self.batches: list[list[bool]] = []
        self.called: asyncio.Event | None = None

    async def batch(self, retriever, queries):
        self.batches.append([query.cached is not None for query in queries])
        if self.called is not None:
            self.called.set()
        return await super().batch(retriever, queries)


class ReadAfterComputeCache(InMemoryBehaviourCache):
    """Reads answer only once the compute backend has been called: a recommender that read
    the cache before computing would wait here for ever."""

    def __init__(self, called: asyncio.Event):
        super().__init__()
        self.called = called

    async def get_retrievals(self, keys):
        await asyncio.wait_for(self.called.wait(), 5)
        return await super().get_retrievals(keys)


def test_a_lone_miss_is_computed_while_its_entry_is_read(bundle, tiny_data):
    compute = WatchedCompute(bundle)
    recommender = Recommender(bundle, compute=compute, write_linger_ms=0)
    events = user_events(tiny_data, 2)

    async def scenario():
        compute.called = asyncio.Event()
        cache = ReadAfterComputeCache(compute.called)
        options = request_options(k=5, candidates=50, cache=cache)
        answer = await recommender.recommend(events, **options)
        await recommender.drain()
        return answer, cache

    answer, cache = asyncio.run(scenario())
    assert answer.cache == "miss" and len(cache.retrievals) == 1  # still read, still written
    assert ids(answer) == ids(recommend(Recommender(bundle), events, k=5, candidates=50))


def test_once_reads_mostly_hit_the_cache_is_read_before_computing(bundle, tiny_data):
    compute = WatchedCompute(bundle)
    recommender = Recommender(bundle, compute=compute, write_linger_ms=0)
    events = user_events(tiny_data, 3)
    cache = InMemoryBehaviourCache()

    async def scenario():
        answers = []
        for _ in range(31):
            options = request_options(k=5, candidates=50, cache=cache)
            answers.append(await recommender.recommend(events, **options))
            await recommender.drain()  # each repeat reads the entry from the cache
        return answers

    first, *repeats = asyncio.run(scenario())
    assert first.cache == "miss" and {r.cache for r in repeats} == {"hit"}
    assert {tuple(ids(r)) for r in repeats} == {tuple(ids(first))}
    with_candidates = [cached for (cached,) in compute.batches]
    # Computed whole while reads still mostly missed, then from the cached candidates only.
    assert with_candidates[:2] == [False, False] and with_candidates[-10:] == [True] * 10
    assert len(cache.retrievals) == 1  # hits are never written again


def test_entries_lingering_at_close_are_written(bundle, tiny_data):
    recommender = Recommender(bundle, write_linger_ms=60_000)  # nothing leaves on its own
    cache = InMemoryBehaviourCache()

    async def scenario():
        answer = await recommender.recommend(
            user_events(tiny_data, 5), **request_options(k=5, candidates=50, cache=cache)
        )
        lingering = len(cache.retrievals)
        await recommender.close()
        return answer, lingering

    answer, lingering = asyncio.run(scenario())
    assert answer.cache == "miss" and lingering == 0
    assert len(cache.retrievals) == 1  # written by the close, not lost

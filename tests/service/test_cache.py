"""The behaviour store: both implementations keep one contract (Redis runs for real here)."""

from __future__ import annotations

import asyncio
import re
import uuid

import numpy as np
import pytest

from service.cache import (
    CachedRetrieval,
    InMemoryBehaviourCache,
    RedisBehaviourCache,
    encode_retrieval,
    history_digest,
    user_key_part,
)
from service.errors import InvalidField, StoreUnavailable
from tests.service.conftest import SHARED_REDIS_URL, free_port

AWKWARD_USER_IDS = [
    "alice",
    "a:b",
    "a",
    "b",
    "*",
    "a*",
    "user 1",
    "user  1",
    " user 1",
    "ünïcødé",
    "ünïcødé ",
    "用户",
    "🙂",
    "a:hist:b",
    "{user}",
    "\n",
    user_key_part("alice"),  # another user's hashed key part is just an id like any other
]


def _runner(kind: str, prefix: str, url: str = SHARED_REDIS_URL):
    """Runs ``scenario(cache)`` against a fresh cache of ``kind`` (Redis at ``url``);
    returns its result."""

    def run(scenario, history_cap: int = 200, ttl_seconds: int = 60):
        async def main():
            if kind == "redis":
                cache = RedisBehaviourCache(url, prefix, history_cap, ttl_seconds)
            else:
                cache = InMemoryBehaviourCache(prefix, history_cap, ttl_seconds)
            try:
                return await scenario(cache)
            finally:
                await cache.close()

        return asyncio.run(main())

    run.prefix = prefix
    return run


@pytest.fixture(params=["memory", "redis", "cluster"])
def store(request):
    """The contract holds for the in-memory twin, for real Redis and for a Redis Cluster
    alike."""
    if request.param == "redis":
        return _runner("redis", request.getfixturevalue("key_prefix"))
    if request.param == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        return _runner("redis", f"t{uuid.uuid4().hex[:20]}", cluster.url)
    return _runner("memory", "test")


@pytest.fixture
def redis_store(key_prefix):
    return _runner("redis", key_prefix)


def test_events_come_back_ordered_by_time(store):
    async def scenario(cache):
        await cache.append_events("u", [("c", 300), ("a", 100)])
        await cache.append_events("u", [("b", 200), ("d", 50)])
        return await cache.history("u")

    assert store(scenario) == [("d", 50), ("a", 100), ("b", 200), ("c", 300)]


def test_events_at_the_same_time_are_ordered_by_item(store):
    async def scenario(cache):
        await cache.append_events("u", [("z", 100), ("m", 100), ("a", 100)])
        return await cache.history("u")

    assert store(scenario) == [("a", 100), ("m", 100), ("z", 100)]


def test_a_retried_event_adds_nothing(store):
    async def scenario(cache):
        first = await cache.append_events("u", [("x", 10), ("y", 20)])
        retried = await cache.append_events("u", [("x", 10), ("y", 20)])
        same_item_later = await cache.append_events("u", [("x", 30)])
        return first, retried, same_item_later, await cache.history("u")

    first, retried, same_item_later, history = store(scenario)
    assert (first, retried, same_item_later) == (2, 0, 1)
    assert history == [("x", 10), ("y", 20), ("x", 30)]


def test_an_event_repeated_inside_one_call_is_stored_once(store):
    async def scenario(cache):
        added = await cache.append_events("u", [("x", 10), ("x", 10)])
        return added, await cache.history("u")

    assert store(scenario) == (1, [("x", 10)])


def test_the_cap_keeps_the_newest_events(store):
    async def scenario(cache):
        await cache.append_events("u", [(f"i{t}", t) for t in (5, 1, 4)])
        await cache.append_events("u", [(f"i{t}", t) for t in (2, 6, 3)])
        return await cache.history("u")

    assert store(scenario, history_cap=3) == [("i4", 4), ("i5", 5), ("i6", 6)]


def test_a_retried_event_older_than_the_kept_window_adds_nothing(store):
    async def scenario(cache):
        await cache.append_events("u", [("a", 10), ("b", 20), ("c", 30)])
        first = await cache.append_events("u", [("old", 5)])
        retried = await cache.append_events("u", [("old", 5)])
        return first, retried, await cache.history("u")

    first, retried, history = store(scenario, history_cap=3)
    assert history == [("a", 10), ("b", 20), ("c", 30)]
    assert (first, retried) == (0, 0)


def test_item_ids_with_colons_survive_the_round_trip(store):
    async def scenario(cache):
        await cache.append_events("u", [("shop:42:red", 7), ("ü 1", 8)])
        return await cache.history("u")

    assert store(scenario) == [("shop:42:red", 7), ("ü 1", 8)]


AWKWARD_ITEM_IDS = [
    "x" * 256,
    "ünïcødé",
    "商品-42",
    "🙂🙃",
    "a:b:c",
    "{tag}",
    "=7",  # the dictionary's own field spellings are just ids too
    "#1",
    "gen",
    "next",
    " ",
    "tab\tnew\nline",
    "nul\x00byte",
    "lone \ud800 surrogate",
]


def test_awkward_and_long_item_ids_come_back_exactly(store):
    events = [(item, 1000 + n) for n, item in enumerate(AWKWARD_ITEM_IDS)]

    async def scenario(cache):
        first = await cache.append_events("u", events[::2])
        second = await cache.append_events("u", events[1::2])
        retried = await cache.append_events("u", events)
        return first + second, retried, await cache.history("u")

    added, retried, history = store(scenario)
    assert (added, retried) == (len(events), 0)
    assert history == events


def test_ties_are_read_in_item_order_whatever_order_they_arrived_in(store):
    async def scenario(cache):
        await cache.append_events("u", [("b", 10)])
        await cache.append_events("u", [("c", 10), ("a", 10)])
        await cache.append_events("u", [("a", 5), ("b", 20)])
        return await cache.history("u")

    assert store(scenario) == [("a", 5), ("a", 10), ("b", 10), ("c", 10), ("b", 20)]


def test_at_the_cap_a_tie_drops_the_item_stored_first(store):
    """Which of two events at the cut's timestamp is dropped: the one whose item the
    deployment stored first (its code is older). The old layout dropped the smaller id."""

    async def scenario(cache):
        await cache.append_events("v", [("b", 1)])  # "b" gets its code before "a"
        await cache.append_events("u", [("b", 10), ("c", 20)])
        added = await cache.append_events("u", [("a", 10)])
        return added, await cache.history("u")

    assert store(scenario, history_cap=2) == (1, [("a", 10), ("c", 20)])


def test_timestamps_outside_the_stored_range_are_refused(store):
    async def scenario(cache):
        for ts in (-1, 2**48):
            with pytest.raises(InvalidField, match=r"events\[1\]\.ts"):
                await cache.append_events("u", [("a", 1), ("b", ts)])
        await cache.append_events("u", [("a", 2**40), ("b", 2**48 - 1), ("c", 0)])
        return await cache.history("u")

    assert store(scenario) == [("c", 0), ("a", 2**40), ("b", 2**48 - 1)]


def test_no_events_add_nothing(store):
    async def scenario(cache):
        return await cache.append_events("u", []), await cache.history("u")

    assert store(scenario) == (0, [])


def test_awkward_user_ids_each_get_their_own_history(store):
    async def scenario(cache):
        for n, user in enumerate(AWKWARD_USER_IDS):
            await cache.append_events(user, [(f"item-{n}", 1000 + n)])
        return [await cache.history(user) for user in AWKWARD_USER_IDS]

    histories = store(scenario)
    for n, history in enumerate(histories):
        assert history == [(f"item-{n}", 1000 + n)], AWKWARD_USER_IDS[n]


def test_user_ids_map_to_distinct_hashed_keys():
    cache = InMemoryBehaviourCache("p")
    keys = [cache.history_key(user) for user in AWKWARD_USER_IDS]
    assert len(set(keys)) == len(keys)
    # The old layout's key of the same user is the hash tag: one Redis Cluster slot.
    pattern = re.compile(r"^p:hp:\{p:hist:[0-9a-f]{40}\}$")
    for user, key in zip(AWKWARD_USER_IDS, keys, strict=True):
        assert pattern.match(key), (user, key)
        assert key == f"p:hp:{{{cache.legacy_history_key(user)}}}"
    # No id can name another user's key, even one spelled like that key.
    assert cache.history_key(keys[0]) != keys[0]
    assert cache.history_key("alice") not in keys[1:]


def test_redis_holds_one_history_key_per_user_and_one_item_dictionary(redis_store, shared_redis):
    async def scenario(cache):
        for user in AWKWARD_USER_IDS:
            await cache.append_events(user, [("x", 1)])

    redis_store(scenario)
    keys = {k.decode() for k in shared_redis.scan_iter(match=f"{redis_store.prefix}:*")}
    names = InMemoryBehaviourCache(redis_store.prefix)
    expected = {names.history_key(u) for u in AWKWARD_USER_IDS}
    assert keys == expected | {names.item_dictionary_key()}


def _retrieval(depth: int = 5, dim: int = 4, seed: int = 0) -> CachedRetrieval:
    rng = np.random.default_rng(seed)
    return CachedRetrieval(
        embedding=rng.normal(size=dim).astype(np.float32),
        ids=rng.permutation(np.arange(1, depth + 1)).astype(np.int64),
        scores=np.sort(rng.normal(size=depth).astype(np.float32))[::-1],
    )


def test_cached_retrievals_come_back_unchanged_in_the_order_asked(store):
    values = [_retrieval(depth=5, seed=0), _retrieval(depth=9, dim=6, seed=1)]

    async def scenario(cache):
        keys = [cache.retrieval_key("tiny", "sasrec", digest) for digest in ("abc", "def")]
        await cache.put_retrievals(list(zip(keys, values, strict=True)))
        return await cache.get_retrievals([keys[1], keys[0] + "x", keys[0]])

    second, missing, first = store(scenario)
    assert missing is None
    for found, value in ((first, values[0]), (second, values[1])):
        assert found.embedding.dtype == np.float32 and found.ids.dtype == np.int64
        np.testing.assert_array_equal(found.embedding, value.embedding)
        np.testing.assert_array_equal(found.ids, value.ids)
        np.testing.assert_array_equal(found.scores, value.scores)


def test_reading_and_writing_no_entries_is_a_no_op(store):
    async def scenario(cache):
        await cache.put_retrievals([])
        return await cache.get_retrievals([])

    assert store(scenario) == []


def test_a_cached_retrieval_expires(redis_store, shared_redis):
    async def scenario(cache):
        key = cache.retrieval_key("tiny", "sasrec", "abc")
        await cache.put_retrievals([(key, _retrieval())])
        return key

    key = redis_store(scenario, ttl_seconds=30)
    assert 0 < shared_redis.ttl(key) <= 30


def test_a_torn_or_foreign_cache_entry_is_a_miss(redis_store, shared_redis):
    keys = [f"{redis_store.prefix}:ret:tiny:sasrec:{name}" for name in "abcd"]
    whole = encode_retrieval(_retrieval(depth=5))
    shared_redis.set(keys[0], whole[:-4])  # cut short
    shared_redis.set(keys[1], b"x" + whole[1:])  # another format
    shared_redis.hset(keys[2], mapping={"emb": b"1234"})  # another kind of value
    shared_redis.set(keys[3], whole)

    async def scenario(cache):
        return await cache.get_retrievals(keys)

    torn, foreign, other_kind, intact = redis_store(scenario)
    assert torn is None and foreign is None and other_kind is None
    assert intact is not None and len(intact.ids) == 5


def test_an_entry_with_mismatched_ids_and_scores_is_refused():
    value = _retrieval(depth=5)
    value.scores = value.scores[:3]
    with pytest.raises(ValueError, match="5 candidate ids but 3 scores"):
        encode_retrieval(value)


def test_retrieval_keys_name_bundle_encoder_and_digest():
    cache = InMemoryBehaviourCache("p")
    assert cache.retrieval_key("tiny", "sasrec", "d1") == "p:ret:tiny:sasrec:d1"
    assert cache.retrieval_key("tiny-v2", "sasrec", "d1") != cache.retrieval_key(
        "tiny", "sasrec", "d1"
    )


def test_history_digest_is_stable_for_the_same_window():
    ids = np.array([[0, 0, 3, 7, 9]], dtype=np.int64)
    deltas = np.array([[0, 0, 0, 60, 5]], dtype=np.float32)
    assert history_digest(ids, deltas) == history_digest(ids.copy(), deltas.copy())


@pytest.mark.parametrize("position", range(5))
def test_history_digest_changes_when_any_id_changes(position):
    ids = np.array([[0, 0, 3, 7, 9]], dtype=np.int64)
    deltas = np.array([[0, 0, 0, 60, 5]], dtype=np.float32)
    changed = ids.copy()
    changed[0, position] += 1
    assert history_digest(changed, deltas) != history_digest(ids, deltas)


@pytest.mark.parametrize("position", range(5))
def test_history_digest_changes_when_any_gap_changes(position):
    ids = np.array([[0, 0, 3, 7, 9]], dtype=np.int64)
    deltas = np.array([[0, 0, 0, 60, 5]], dtype=np.float32)
    changed = deltas.copy()
    changed[0, position] += 1
    assert history_digest(ids, changed) != history_digest(ids, deltas)


def test_history_digest_tells_a_shifted_window_apart():
    # The same ids one slot further left are another history (another padding length).
    assert history_digest(
        np.array([[0, 3, 7]], dtype=np.int64), np.zeros((1, 3), np.float32)
    ) != history_digest(np.array([[3, 7]], dtype=np.int64), np.zeros((1, 2), np.float32))


def test_an_unavailable_in_memory_store_raises_store_unavailable():
    async def scenario():
        cache = InMemoryBehaviourCache()
        cache.available = False
        with pytest.raises(StoreUnavailable):
            await cache.append_events("u", [("x", 1)])
        with pytest.raises(StoreUnavailable):
            await cache.history("u")
        with pytest.raises(StoreUnavailable):
            await cache.get_retrievals(["k"])
        assert await cache.ping() is False

    asyncio.run(scenario())


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
def test_unreachable_redis_raises_store_unavailable_quickly(scheme):
    import time

    async def scenario():
        cache = RedisBehaviourCache(f"{scheme}://127.0.0.1:{free_port()}/0", "p", 10, 10)
        try:
            started = time.perf_counter()
            with pytest.raises(StoreUnavailable):
                await cache.append_events("u", [("x", 1)])
            with pytest.raises(StoreUnavailable):
                await cache.history("u")
            with pytest.raises(StoreUnavailable):
                await cache.put_retrievals([("p:ret:b:e:d", _retrieval())])
            with pytest.raises(StoreUnavailable):
                await cache.get_retrievals(["p:ret:b:e:d"])
            assert await cache.ping() is False
            return time.perf_counter() - started
        finally:
            await cache.close()

    assert asyncio.run(scenario()) < 2.0

"""The compact history layout against real Redis: the script's rule, memory, concurrent
writers, the item dictionary's generations, and the migration from the old layout."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from service.cache import InMemoryBehaviourCache, RedisBehaviourCache, history_member
from service.errors import StoreUnavailable
from service.history_store import (
    APPEND_SCRIPT,
    HEADER,
    RECORD_SIZE,
    merge_records,
    pack_history,
    pack_members,
    pack_records,
)
from service.migrate_histories import main as migrate_main
from service.migrate_histories import migrate
from tests.servers import REPO
from tests.service.conftest import ON_BOTH_REDIS, SHARED_REDIS_URL


def run_with(prefix: str, scenario, url: str = SHARED_REDIS_URL, caches: int = 1, **options):
    """Runs ``scenario(*caches)`` with ``caches`` workers' stores of one deployment."""

    async def main():
        stores = [
            RedisBehaviourCache(url, prefix, options.get("history_cap", 200), 60, timeout=5.0)
            for _ in range(caches)
        ]
        try:
            return await scenario(*stores)
        finally:
            for store in stores:
                await store.close()

    return asyncio.run(main())


def legacy_write(client, key: str, events: list[tuple[str, int]]) -> None:
    """What the old layout's writer stored."""
    client.zadd(key, {history_member(item, ts): ts for item, ts in events})


# --------------------------------------------------------------------- the script's rule


def _records(rng, count: int) -> list[tuple[int, int]]:
    # Few timestamps and codes, so that repeats and ties are common.
    return [(int(rng.integers(0, 12)), int(rng.integers(1, 6))) for _ in range(count)]


def test_the_script_merges_as_merge_records_says(shared_redis, key_prefix):
    script = shared_redis.register_script(APPEND_SCRIPT)
    rng = np.random.default_rng(7)
    key, legacy_key = f"{key_prefix}:hp:{{k}}", f"{key_prefix}:hist:k"
    for case in range(300):
        cap = int(rng.integers(1, 12))
        stored = pack_records(_records(rng, int(rng.integers(0, 15))))
        legacy = pack_records(_records(rng, int(rng.integers(0, 6)))) if case % 3 == 0 else b""
        new = pack_records(_records(rng, int(rng.integers(0, 8))))
        shared_redis.delete(key, legacy_key)
        if stored:
            shared_redis.set(key, pack_history(5, stored))
        members = [b"m%d" % i for i in range(len(legacy) // RECORD_SIZE)]
        if members:
            shared_redis.zadd(legacy_key, dict.fromkeys(members, 0))
        reply = script(
            keys=[key, legacy_key],
            args=[5, cap, "", len(members) if members else -1, legacy, new, pack_members(members)],
        )
        body, added = merge_records(stored, legacy, new, cap)
        assert reply == [added], case
        assert shared_redis.get(key) == (pack_history(5, body) if body else None), case
        assert not shared_redis.exists(legacy_key)


def test_the_script_answers_without_writing_when_it_needs_more(shared_redis, key_prefix):
    script = shared_redis.register_script(APPEND_SCRIPT)
    key, legacy_key = f"{key_prefix}:hp:{{k}}", f"{key_prefix}:hist:k"
    shared_redis.set(key, pack_history(5, pack_records([(1, 1)])))
    new = pack_records([(2, 2)])
    # Another generation's history, unless told to discard exactly that one.
    assert script(keys=[key, legacy_key], args=[6, 10, "", -1, b"", new]) == [-2, 5]
    assert script(keys=[key, legacy_key], args=[6, 10, "4", -1, b"", new]) == [-2, 5]
    # The old layout's key: not read, or changed since it was read.
    shared_redis.zadd(legacy_key, {"1:a": 1, "3:b": 3})
    assert script(keys=[key, legacy_key], args=[5, 10, "", -1, b"", new]) == [-1]
    legacy = pack_records([(1, 3)])
    read_before = pack_members([b"1:a"])
    assert script(keys=[key, legacy_key], args=[5, 10, "", 1, legacy, new, read_before]) == [-1]
    read_now = pack_members([b"1:a", b"3:c"])  # as many members, not the same
    assert script(keys=[key, legacy_key], args=[5, 10, "", 2, legacy, new, read_now]) == [-1]
    assert shared_redis.get(key) == pack_history(5, pack_records([(1, 1)]))
    assert shared_redis.zcard(legacy_key) == 2
    assert script(keys=[key, legacy_key], args=[6, 10, "5", -1, b"", new]) == [-1]


# --------------------------------------------------------------------------- memory


def test_a_full_history_takes_at_most_16_bytes_an_event(shared_redis, key_prefix):
    async def scenario(cache):
        for n in range(0, 400, 20):
            await cache.append_events(
                "u", [(f"item-{n + i}", 1_700_000_000 + n + i) for i in range(20)]
            )
        return cache.history_key("u"), cache.legacy_history_key("u"), await cache.history("u")

    key, legacy_key, history = run_with(key_prefix, scenario)
    assert len(history) == 200
    legacy_write(shared_redis, legacy_key, history)
    new_bytes, old_bytes = shared_redis.memory_usage(key), shared_redis.memory_usage(legacy_key)
    assert shared_redis.strlen(key) == HEADER.size + 200 * RECORD_SIZE
    assert new_bytes <= 16 * 200 and new_bytes * 5 < old_bytes, (new_bytes, old_bytes)


# ---------------------------------------------------------------- concurrent writers

WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from service.cache import RedisBehaviourCache

    url, prefix, writer = sys.argv[1], sys.argv[2], int(sys.argv[3])

    async def main():
        cache = RedisBehaviourCache(url, prefix, 1000, 60, timeout=5.0)

        async def task(t):
            added = 0
            for k in range(10):
                ts = 1000 * writer + 100 * t + k
                added += await cache.append_events("shared", [(f"item-{ts % 7}", ts)])
                added += await cache.append_events("shared", [(f"item-{ts % 7}", ts)])
            return added

        try:
            print(sum(await asyncio.gather(*(task(t) for t in range(5)))))
        finally:
            await cache.close()

    asyncio.run(main())
    """
)


def test_concurrent_writers_in_several_processes_lose_nothing(shared_redis, key_prefix):
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, SHARED_REDIS_URL, key_prefix, str(w)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        for w in range(4)
    ]
    added = [int(w.communicate(timeout=120)[0]) for w in writers]
    assert all(w.returncode == 0 for w in writers)
    expected = sorted(
        (f"item-{ts % 7}", ts)
        for ts in (1000 * w + 100 * t + k for w in range(4) for t in range(5) for k in range(10))
    )
    assert sum(added) == len(expected) == 200  # each event once, its retry never

    async def scenario(cache):
        return await cache.history("shared")

    assert run_with(key_prefix, scenario, history_cap=1000) == sorted(expected, key=lambda e: e[1])
    fields = shared_redis.hkeys(f"{key_prefix}:itemcodes")
    assert sorted(f for f in fields if f.startswith(b"=")) == [b"=item-%d" % i for i in range(7)]


def test_concurrent_writers_at_the_cap_keep_the_newest(key_prefix):
    async def scenario(*caches):
        async def write(cache, w):
            for k in range(25):
                await cache.append_events("u", [(f"i{w}-{k}", 8 * k + w)])

        await asyncio.gather(*(write(cache, w) for w, cache in enumerate(caches * 2)))
        return await caches[0].history("u")

    history = run_with(key_prefix, scenario, caches=4, history_cap=50)
    assert [ts for _, ts in history] == list(range(200 - 50, 200))


# ----------------------------------------------------------------- the item dictionary


def test_every_worker_reads_every_workers_codes(key_prefix):
    async def scenario(a, b):
        await a.append_events("u", [("x", 1), ("y", 2)])
        await b.append_events("u", [("z", 3), ("x", 4)])
        return await a.history("u"), await b.history("u"), a.codes.code_of, b.codes.code_of

    from_a, from_b, codes_a, codes_b = run_with(key_prefix, scenario, caches=2)
    assert from_a == from_b == [("x", 1), ("y", 2), ("z", 3), ("x", 4)]
    assert codes_a == codes_b == {"x": 1, "y": 2, "z": 3}


def test_a_worker_remembers_a_bounded_number_of_codes(key_prefix):
    async def scenario(cache):
        cache.codes.capacity = 16
        events = [(f"item-{n}", n) for n in range(100)]
        await cache.append_events("u", events)
        assert len(cache.codes.code_of) <= 16
        return await cache.history("u") == events

    assert run_with(key_prefix, scenario)


def test_a_lost_dictionary_never_makes_a_history_name_other_items(shared_redis, key_prefix, caplog):
    caplog.set_level(logging.WARNING, "service.cache")
    dictionary = f"{key_prefix}:itemcodes"

    async def scenario(a, b):
        await a.append_events("u1", [("x", 1)])
        shared_redis.delete(dictionary)  # lost, while the histories and a's memory remain
        await b.append_events("u2", [("y", 2)])  # a new dictionary: "y" gets x's old code
        assert await b.history("u1") == []  # not [("y", 1)]
        # a still writes from memory (its generation was confirmed a moment ago) ...
        await a.append_events("u3", [("x", 3)])
        assert await b.history("u3") == []
        # ... until it meets a history of the new generation, and asks the dictionary.
        await a.append_events("u2", [("x", 4)])
        assert await a.history("u2") == await b.history("u2") == [("y", 2), ("x", 4)]
        assert await a.history("u1") == []
        # A write replaces a history nothing can read any more.
        assert await b.append_events("u3", [("z", 5)]) == 1
        return await a.history("u3")

    assert run_with(key_prefix, scenario, caches=2) == [("z", 5)]
    assert "no longer exists" in caplog.text


def test_a_worker_confirms_the_generation_before_writing_from_memory_for_long(
    shared_redis, key_prefix
):
    async def scenario(a, b):
        await a.append_events("u1", [("x", 1)])
        shared_redis.delete(f"{key_prefix}:itemcodes")
        await b.append_events("u2", [("y", 2)])
        a.codes.checked_at -= 3600  # its generation last confirmed long ago
        await a.append_events("u3", [("x", 3)])
        return await b.history("u3")

    assert run_with(key_prefix, scenario, caches=2) == [("x", 3)]


# ------------------------------------------------------------------------ Redis itself


def test_a_restarted_redis_is_unavailable_then_written_again(redis_server):
    async def scenario(cache):
        await cache.append_events("u", [("x", 1)])
        redis_server.stop()
        with pytest.raises(StoreUnavailable):
            await cache.append_events("u", [("y", 2)])
        with pytest.raises(StoreUnavailable):
            await cache.history("u")
        redis_server.start()  # empty, without the scripts: they are loaded again
        assert await cache.append_events("u", [("y", 2)]) == 1
        return await cache.history("u")

    assert run_with("p", scenario, url=redis_server.url) == [("y", 2)]


# ---------------------------------------------------------------- the old layout


def test_an_old_layout_history_reads_as_it_did(shared_redis, key_prefix):
    events = [("a:1", 10), ("ü", 5), ("b", 10), ("c", 30)]
    legacy_write(shared_redis, InMemoryBehaviourCache(key_prefix).legacy_history_key("u"), events)

    async def scenario(cache):
        return await cache.history("u")

    assert run_with(key_prefix, scenario) == [("ü", 5), ("a:1", 10), ("b", 10), ("c", 30)]


def test_the_first_write_converts_the_old_layout(shared_redis, key_prefix):
    names = InMemoryBehaviourCache(key_prefix)
    legacy_write(shared_redis, names.legacy_history_key("u"), [("a", 10), ("b", 20), ("c", 30)])

    async def scenario(cache):
        retried = await cache.append_events("u", [("b", 20)])
        added = await cache.append_events("u", [("b", 20), ("d", 25), ("old", 1)])
        return retried, added, await cache.history("u")

    retried, added, history = run_with(key_prefix, scenario, history_cap=4)
    assert (retried, added) == (0, 1)
    assert history == [("a", 10), ("b", 20), ("d", 25), ("c", 30)]
    assert not shared_redis.exists(names.legacy_history_key("u"))
    assert shared_redis.type(names.history_key("u")) == b"string"


def test_a_member_written_by_an_old_worker_during_the_conversion_is_kept(
    shared_redis, key_prefix, monkeypatch
):
    names = InMemoryBehaviourCache(key_prefix)
    legacy_key = names.legacy_history_key("u")
    legacy_write(shared_redis, legacy_key, [("a", 10)])
    original = RedisBehaviourCache._read_legacy
    reads = []

    async def read_then_an_old_worker_writes(self, key):
        read = await original(self, key)
        reads.append(read)
        if len(reads) == 1:
            legacy_write(shared_redis, legacy_key, [("late", 15)])
        return read

    monkeypatch.setattr(RedisBehaviourCache, "_read_legacy", read_then_an_old_worker_writes)

    async def scenario(cache):
        added = await cache.append_events("u", [("b", 20)])
        return added, await cache.history("u")

    assert run_with(key_prefix, scenario) == (1, [("a", 10), ("late", 15), ("b", 20)])
    assert len(reads) == 2 and not shared_redis.exists(legacy_key)


def test_a_malformed_old_member_is_dropped_with_a_warning(shared_redis, key_prefix, caplog):
    names = InMemoryBehaviourCache(key_prefix)
    shared_redis.zadd(names.legacy_history_key("u"), {"10:a": 10, "garbage": 11})

    async def scenario(cache):
        before = await cache.history("u")
        await cache.append_events("u", [("b", 20)])
        return before, await cache.history("u")

    assert run_with(key_prefix, scenario) == ([("a", 10)], [("a", 10), ("b", 20)])
    assert "malformed" in caplog.text


@ON_BOTH_REDIS
def test_migrate_converts_every_old_history_once(redis_client, redis_url, key_prefix):
    names = InMemoryBehaviourCache(key_prefix)
    expected = {}
    old_events = 0
    for n in range(60):
        events = [(f"item-{(n * k) % 13}", 100 * k + n) for k in range(1, n % 7 + 2)]
        legacy_write(redis_client, names.legacy_history_key(f"user-{n}"), events)
        expected[f"user-{n}"] = sorted(events, key=lambda e: e[1])
        old_events += len(events) if n else 0

    async def scenario(cache):
        await cache.append_events("user-0", [("new", 1)])  # converted already
        expected["user-0"].insert(0, ("new", 1))
        counted = await migrate(cache, dry_run=True, log=lambda _: None)
        converted = await migrate(cache, concurrency=8, log=lambda _: None)
        again = await migrate(cache, log=lambda _: None)
        histories = {user: await cache.history(user) for user in expected}
        return counted, converted, again, histories

    counted, converted, again, histories = run_with(key_prefix, scenario, redis_url)
    assert (counted["users"], counted["events"]) == (59, old_events)
    assert (converted["users"], converted["events"]) == (59, old_events)
    assert (again["users"], again["events"]) == (0, 0)
    assert histories == expected
    assert not list(redis_client.scan_iter(match=f"{key_prefix}:hist:*"))


def test_the_migration_command_reads_the_service_settings(
    shared_redis, key_prefix, monkeypatch, capsys, clean_recserve_environment
):
    names = InMemoryBehaviourCache(key_prefix)
    legacy_write(shared_redis, names.legacy_history_key("u"), [("a", 1), ("b", 2)])
    monkeypatch.setenv("RECSERVE_REDIS_URL", SHARED_REDIS_URL)
    monkeypatch.setenv("RECSERVE_KEY_PREFIX", key_prefix)
    assert migrate_main([]) == 0
    assert "converted: 1 users, 2 events" in capsys.readouterr().out
    assert shared_redis.type(names.history_key("u")) == b"string"
    monkeypatch.setenv("RECSERVE_REDIS_URL", "redis://127.0.0.1:1/0")
    assert migrate_main([]) == 1
    assert "Redis unavailable" in capsys.readouterr().err

"""What a user's history costs in Redis, in the old layout and the new, and how fast it is
written and read.

    .venv/bin/python -m bench.history_memory --users 500 --ops 2000 --rounds 3 \
        --out docs/history_memory.json

Runs against a private ``redis-server`` on a free port (``--redis-url`` to use another;
everything it writes is under a fresh key prefix, deleted afterwards).

1. **Memory**: ``--users`` users with 20 and with 200 events each (the default cap), written
   in each layout: the old one (a sorted set of ``"ts:item"`` members per user, written
   and read by the code the service ran before, ``OldLayout``) and the new one
   (``service.cache.RedisBehaviourCache``: one packed string per user and the item
   dictionary). Per user: ``MEMORY USAGE key SAMPLES 0`` (exact, not sampled), median
   and mean; per event: that over the events. The item dictionary is per deployment, not
   per user: its ``MEMORY USAGE`` is reported per item it holds. Items are drawn from a
   ``--items`` catalogue with ids like ``item-12345``; timestamps are Unix seconds near
   1.7e9 with gaps of up to an hour.
2. **Latency**: on users at the cap, ``--ops`` single-event appends (a new event, as
   ``POST /events`` sends one) and ``--ops`` reads of the whole history, each call timed
   alone, sequentially, through redis-py's asyncio client as the service uses it. The new
   layout twice: ``new`` (the worker remembers the item codes: the steady state) and
   ``new, codes not remembered`` (``item_code_cache=0``: every append asks the item
   dictionary first and every read asks it for all the codes; what a worker pays while
   its memory lacks the items, e.g. a catalogue larger than ``RECSERVE_ITEM_CODE_CACHE``).
   Also the CPU time per call of the client (this process, ``time.process_time``) and,
   with the private Redis, of the server (``INFO cpu`` before and after): what a call
   costs each side, which a loaded machine's scheduling does not inflate as it does the
   wall-clock latency.
   Rounds alternate the order of the layouts; the summary is the median over rounds.
3. **Migration**: ``--users`` old-layout users at the cap converted by
   ``service.migrate_histories.migrate``: users and events per second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = (20, 200)
CAP = 200
START_TS = 1_700_000_000


class OldLayout:
    """The sorted-set layout, written and read as service/cache.py did before the packed
    one (commit a75ac14), on the new store's client (the same connection settings)."""

    def __init__(self, store):
        self.store = store
        self.client = store.client

    async def append_events(self, user_id: str, events: list[tuple[str, int]]) -> int:
        from service.cache import history_member, redis_call

        key = self.store.legacy_history_key(user_id)
        members = {history_member(item, ts): ts for item, ts in events}
        names = list(members)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.zmscore(key, names)
            pipe.zadd(key, members)
            pipe.zremrangebyrank(key, 0, -(self.store.history_cap + 1))
            pipe.zmscore(key, names)
            before, _, _, after = await redis_call(pipe.execute())
        return sum(b is None and a is not None for b, a in zip(before, after, strict=True))

    async def history(self, user_id: str) -> list[tuple[str, int]]:
        from service.cache import parse_history_member, redis_call

        members = await redis_call(
            self.client.zrange(self.store.legacy_history_key(user_id), 0, -1)
        )
        return [parse_history_member(m) for m in members]

    def key(self, user_id: str) -> str:
        return self.store.legacy_history_key(user_id)


class NewLayout:
    """The packed layout, as the service writes and reads it."""

    def __init__(self, store):
        self.store = store
        self.append_events = store.append_events
        self.history = store.history

    def key(self, user_id: str) -> str:
        return self.store.history_key(user_id)


def user_events(rng, items: int, count: int) -> list[tuple[str, int]]:
    """``count`` events of one user: random catalogue items, increasing times."""
    gaps = rng.integers(1, 3600, size=count)
    ts = START_TS + np.cumsum(gaps)
    chosen = rng.integers(0, items, size=count)
    return [(f"item-{int(i)}", int(t)) for i, t in zip(chosen, ts, strict=True)]


async def write_users(layout, users: list[str], histories: dict) -> None:
    for user in users:
        events = histories[user]
        for start in range(0, len(events), 20):
            await layout.append_events(user, events[start : start + 20])


async def memory_of(client, keys: list[str]) -> list[int]:
    return [int(await client.memory_usage(key, samples=0)) for key in keys]


async def measure_memory(store, layouts: dict, users: int, items: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    rows = {}
    for size in SIZES:
        for label, layout in layouts.items():
            # Users of their own per layout: the new layout would convert an old one it meets.
            names = [f"m{label}{size}-{n}" for n in range(users)]
            histories = {user: user_events(rng, items, size) for user in names}
            await write_users(layout, names, histories)
            sample = names[0]
            read = await layout.history(sample)
            assert read == sorted(histories[sample], key=lambda e: (e[1], e[0])), label
            usage = await memory_of(store.client, [layout.key(user) for user in names])
            rows[f"{label}-{size}"] = {
                "layout": label,
                "events": size,
                "users": users,
                "bytes_per_user_median": statistics.median(usage),
                "bytes_per_user_mean": round(statistics.fmean(usage), 1),
                "bytes_per_event": round(statistics.median(usage) / size, 2),
            }
    key = store.item_dictionary_key()
    dictionary = int(await store.client.memory_usage(key, samples=0))
    entries = (await store.client.hlen(key) - 2) // 2  # less "gen" and "next"; two per item
    rows["item-dictionary"] = {
        "items": entries,
        "bytes": dictionary,
        "bytes_per_item": round(dictionary / max(entries, 1), 1),
    }
    return rows


def percentiles(samples: list[float]) -> dict:
    micro = np.asarray(samples) * 1e6
    return {
        "p50_us": round(float(np.percentile(micro, 50)), 1),
        "p99_us": round(float(np.percentile(micro, 99)), 1),
    }


async def redis_cpu_seconds(client) -> float:
    """The Redis server's CPU time so far (user and system, all its threads)."""
    cpu = await client.info("cpu")
    return cpu["used_cpu_user"] + cpu["used_cpu_sys"]


async def time_layout(
    layout, users: list[str], next_ts: dict, ops: int, rng, *, client=None
) -> dict:
    """``ops`` appends and then ``ops`` reads, each timed alone; with ``client`` (a Redis
    nothing else uses), the server's CPU time per call too."""
    appends, reads, server = [], [], {}
    picks = rng.integers(0, len(users), size=ops)
    items = rng.integers(0, 1000, size=ops)
    cpu = await redis_cpu_seconds(client) if client else 0.0
    own = time.process_time()
    for pick, item in zip(picks, items, strict=True):
        user = users[pick]
        next_ts[user] += 1
        started = time.perf_counter()
        await layout.append_events(user, [(f"item-{int(item)}", next_ts[user])])
        appends.append(time.perf_counter() - started)
    mine = {"append": (time.process_time() - own) / ops * 1e6}
    if client:
        server["append"] = (await redis_cpu_seconds(client) - cpu) / ops * 1e6
        cpu = await redis_cpu_seconds(client)
    own = time.process_time()
    for pick in rng.integers(0, len(users), size=ops):
        started = time.perf_counter()
        history = await layout.history(users[pick])
        reads.append(time.perf_counter() - started)
        assert len(history) == CAP
    mine["read"] = (time.process_time() - own) / ops * 1e6
    if client:
        server["read"] = (await redis_cpu_seconds(client) - cpu) / ops * 1e6
    result = {"append": percentiles(appends), "read": percentiles(reads)}
    for op in result:
        result[op]["client_cpu_us"] = round(mine[op], 1)
        if op in server:
            result[op]["redis_us"] = round(server[op], 1)
    return result


async def measure_latency(
    url: str, prefix: str, sizes: dict, rounds: int, seed: int, *, private: bool
) -> dict:
    from service.cache import RedisBehaviourCache

    warm = RedisBehaviourCache(url, prefix, CAP, 60, timeout=5.0)
    cold = RedisBehaviourCache(url, prefix, CAP, 60, timeout=5.0, item_code_cache=0)
    layouts = {
        "old": OldLayout(warm),
        "new": NewLayout(warm),
        "new, codes not remembered": NewLayout(cold),
    }
    rng = np.random.default_rng(seed)
    # Users of their own per layout: the new layout would convert an old one it meets.
    names = {layout: [f"l{layout}-{n}" for n in range(sizes["users"])] for layout in ("old", "new")}
    next_ts = {}
    for layout, users in names.items():
        histories = {user: user_events(rng, sizes["items"], CAP) for user in users}
        await write_users(layouts[layout], users, histories)
        next_ts.update((user, events[-1][1]) for user, events in histories.items())
    # The steady state: the worker has met the items the appends name.
    await warm.append_events("warm-up", [(f"item-{i}", START_TS) for i in range(1000)])
    per_round = {label: [] for label in layouts}
    order = list(layouts)
    try:
        for r in range(rounds):
            for label in order[r % len(order) :] + order[: r % len(order)]:
                users = names["old" if label == "old" else "new"]
                result = await time_layout(
                    layouts[label],
                    users,
                    next_ts,
                    sizes["ops"],
                    rng,
                    client=warm.client if private else None,
                )
                per_round[label].append(result)
    finally:
        await cold.close()
        await warm.close()
    summary = {}
    for label, results in per_round.items():
        summary[label] = {
            op: {
                stat: round(statistics.median(r[op][stat] for r in results), 1)
                for stat in ("p50_us", "p99_us", "client_cpu_us", "redis_us")
                if stat in results[0][op]
            }
            for op in ("append", "read")
        }
        summary[label]["rounds"] = results
    return summary


async def measure_migration(url: str, prefix: str, users: int, items: int, seed: int) -> dict:
    from service.cache import RedisBehaviourCache
    from service.migrate_histories import migrate

    store = RedisBehaviourCache(url, prefix, CAP, 60, timeout=5.0)
    try:
        old = OldLayout(store)
        rng = np.random.default_rng(seed)
        names = [f"g-{n}" for n in range(users)]
        histories = {user: user_events(rng, items, CAP) for user in names}
        await write_users(old, names, histories)
        result = await migrate(store, log=lambda _: None)
        sample = names[-1]
        assert await store.history(sample) == sorted(histories[sample], key=lambda e: (e[1], e[0]))
    finally:
        await store.close()
    return {
        "users": result["users"],
        "events": result["events"],
        "seconds": result["seconds"],
        "users_per_second": round(result["users"] / result["seconds"]),
        "events_per_second": round(result["events"] / result["seconds"]),
    }


def table(result: dict) -> str:
    """The Markdown tables of docs/BENCHMARKS.md."""
    memory = result["memory"]
    lines = [
        "| events per user | old: bytes per user (per event) | new: bytes per user (per event) "
        "| new / old |",
        "| --- | --- | --- | --- |",
    ]
    for size in SIZES:
        old, new = memory[f"old-{size}"], memory[f"new-{size}"]
        lines.append(
            f"| {size} | {old['bytes_per_user_median']:,.0f} ({old['bytes_per_event']}) "
            f"| {new['bytes_per_user_median']:,.0f} ({new['bytes_per_event']}) "
            f"| {new['bytes_per_user_median'] / old['bytes_per_user_median']:.3f} |"
        )
    dictionary = memory["item-dictionary"]
    lines += [
        "",
        f"Item dictionary: {dictionary['items']:,} items, {dictionary['bytes']:,} bytes "
        f"({dictionary['bytes_per_item']} per item).",
        "",
        "| layout | append p50 / p99 us | append CPU us: client, Redis "
        "| read p50 / p99 us | read CPU us: client, Redis |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, row in result["latency"].items():
        cells = [
            f"{row[op]['p50_us']} / {row[op]['p99_us']} "
            f"| {row[op]['client_cpu_us']}, {row[op].get('redis_us', '-')}"
            for op in ("append", "read")
        ]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    migration = result["migration"]
    lines += [
        "",
        f"Migration: {migration['users']:,} users ({migration['events']:,} events) in "
        f"{migration['seconds']} s: {migration['users_per_second']:,} users/s.",
    ]
    return "\n".join(lines)


async def run(url: str, args) -> dict:
    from service.cache import RedisBehaviourCache

    prefix = f"bench{uuid.uuid4().hex[:12]}"
    store = RedisBehaviourCache(url, prefix, CAP, 60, timeout=5.0)
    try:
        info = await store.client.info("server")
        layouts = {"old": OldLayout(store), "new": NewLayout(store)}
        memory = await measure_memory(store, layouts, args.users, args.items, args.seed)
        sizes = {"users": args.users, "items": args.items, "ops": args.ops}
        latency = await measure_latency(
            url, prefix, sizes, args.rounds, args.seed + 1, private=not args.redis_url
        )
        # A prefix of its own: the migration converts every old-layout key it finds.
        migration = await measure_migration(
            url, prefix + "m", args.users, args.items, args.seed + 2
        )
    finally:
        for each in (prefix, prefix + "m"):
            async for key in store.client.scan_iter(match=f"{each}:*", count=1000):
                await store.client.delete(key)
        await store.close()
    return {
        "redis_version": info.get("redis_version"),
        "users": args.users,
        "items": args.items,
        "ops": args.ops,
        "rounds": args.rounds,
        "cap": CAP,
        "memory": memory,
        "latency": latency,
        "migration": migration,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--redis-url", help="default: a private redis-server on a free port")
    parser.add_argument("--users", type=int, default=500, help="users per case")
    parser.add_argument("--items", type=int, default=100_000, help="catalogue size")
    parser.add_argument("--ops", type=int, default=2000, help="timed calls per case and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the JSON here too")
    args = parser.parse_args(argv)
    if args.redis_url:
        result = asyncio.run(run(args.redis_url, args))
    else:
        from tests.servers import RedisProcess, free_port

        with tempfile.TemporaryDirectory() as workdir:
            server = RedisProcess(free_port(), Path(workdir))
            server.start()
            try:
                result = asyncio.run(run(server.url, args))
            finally:
                server.stop()
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))  # noqa: T201 (the bench's answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())

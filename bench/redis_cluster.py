"""What the behaviour store's calls cost on one Redis, on a Redis Cluster, and with history
writes waited for on a replica (``RECSERVE_HISTORY_WAIT_REPLICAS=1``).

    .venv/bin/python -m bench.redis_cluster --ops 2000 --rounds 3 --out docs/redis_cluster.json

Starts its own servers on free loopback ports (tests/servers.py): one redis-server with a
replica, and a cluster of three primaries with a replica each; nothing else is touched.
Per setup, through ``service.cache.RedisBehaviourCache`` as the service calls it, each
call timed alone, sequentially:

- ``append``: one new event for one of ``--users`` users (what ``POST /events`` sends;
  the worker remembers the item codes: the steady state);
- ``history``: one user's whole history (a ``/recommend`` by user id);
- ``get32`` / ``put32``: a batch of 32 retrieval-cache entries (a full micro-batch's
  read, hits, and its write), each entry 200 candidates of a 64-wide embedding.

Setups: ``single`` (one server, no wait), ``single_wait1`` (the same server, each history
write waited for on its replica), ``cluster``, ``cluster_wait1``. Rounds alternate the
order of the setups; the summary is the median over rounds of each percentile.
``--setups single`` runs one setup alone (to compare the single-server path of two
revisions of the code).
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

from service.cache import CachedRetrieval, RedisBehaviourCache
from tests.servers import RedisClusterProcesses, RedisProcess, free_port, wait_until

SETUPS = ("single", "single_wait1", "cluster", "cluster_wait1")
OPS = ("append", "history", "get32", "put32")


def percentiles(samples: list[float]) -> dict:
    ordered = np.sort(np.asarray(samples)) * 1e6
    return {
        "p50_us": round(float(np.percentile(ordered, 50)), 1),
        "p99_us": round(float(np.percentile(ordered, 99)), 1),
    }


async def measure(url: str, wait: int, users: int, ops: int, seed: int) -> dict:
    """Each call's latency, per kind of call, against the store at ``url``."""
    options = {"wait_replicas": wait} if wait else {}
    cache = RedisBehaviourCache(url, f"b{uuid.uuid4().hex[:12]}", 200, 600, 1.0, **options)
    rng = np.random.default_rng(seed)
    names = [f"user-{n}" for n in range(users)]
    try:
        for n, user in enumerate(names):  # twenty events each, codes assigned
            await cache.append_events(user, [(f"item-{(n + k) % 500}", k) for k in range(20)])
        entry = CachedRetrieval(
            rng.normal(size=64).astype(np.float32),
            rng.permutation(200).astype(np.int64),
            np.sort(rng.normal(size=200).astype(np.float32))[::-1],
        )
        batches = [
            [cache.retrieval_key("b", "e", uuid.uuid4().hex) for _ in range(32)] for _ in range(8)
        ]
        for keys in batches:
            await cache.put_retrievals([(key, entry) for key in keys])
        timings: dict[str, list[float]] = {op: [] for op in OPS}
        for n in range(ops):
            user = names[int(rng.integers(users))]
            keys = batches[n % len(batches)]
            calls = {
                "append": cache.append_events(user, [(f"item-{n % 500}", 1000 + n)]),
                "history": cache.history(user),
                "get32": cache.get_retrievals(keys),
                "put32": cache.put_retrievals([(key, entry) for key in keys]),
            }
            for op, call in calls.items():
                started = time.perf_counter()
                await call
                timings[op].append(time.perf_counter() - started)
        return {op: percentiles(samples) for op, samples in timings.items()}
    finally:
        await cache.close()


def start_servers(workdir: Path, setups: list[str]) -> tuple[dict, list]:
    """The URL of each setup and what to stop afterwards."""
    urls, running = {}, []
    if any(s.startswith("single") for s in setups):
        primary = RedisProcess(free_port(), workdir / "single")
        primary.start()
        running.append(primary)
        follow = ("--replicaof", "127.0.0.1", str(primary.port))
        replica = RedisProcess(free_port(), workdir / "replica", extra_args=follow)
        replica.start()
        running.append(replica)
        import redis

        probe = redis.Redis(port=replica.port)
        wait_until(
            lambda: probe.info("replication").get("master_link_status") == "up", 30, what="sync"
        )
        probe.close()
        urls["single"] = urls["single_wait1"] = primary.url
    if any(s.startswith("cluster") for s in setups):
        cluster = RedisClusterProcesses(workdir / "cluster")
        cluster.start()
        running.append(cluster)
        urls["cluster"] = urls["cluster_wait1"] = cluster.url
    return urls, running


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--ops", type=int, default=2000, help="timed calls per kind and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--setups", nargs="+", choices=SETUPS, default=list(SETUPS))
    parser.add_argument("--out", type=Path, help="write the JSON here too")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        urls, running = start_servers(Path(workdir), args.setups)
        try:
            rounds = []
            for r in range(args.rounds):
                order = args.setups if r % 2 == 0 else args.setups[::-1]
                rounds.append(
                    {
                        setup: asyncio.run(
                            measure(
                                urls[setup],
                                1 if setup.endswith("wait1") else 0,
                                args.users,
                                args.ops,
                                seed=r,
                            )
                        )
                        for setup in order
                    }
                )
        finally:
            for server in running:
                server.stop()
    summary = {
        setup: {
            op: {
                stat: statistics.median(found[setup][op][stat] for found in rounds)
                for stat in ("p50_us", "p99_us")
            }
            for op in OPS
        }
        for setup in args.setups
    }
    result = {"args": vars(args) | {"out": str(args.out)}, "rounds": rounds, "summary": summary}
    print(f"{'setup':<14}" + "".join(f"{op + ' p50/p99 us':>24}" for op in OPS))  # noqa: T201
    for setup, figures in summary.items():
        cells = "".join(
            f"{figures[op]['p50_us']:>14.0f} / {figures[op]['p99_us']:<7.0f}" for op in OPS
        )
        print(f"{setup:<14}{cells}")  # noqa: T201
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

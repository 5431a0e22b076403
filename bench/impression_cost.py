"""What logging an impression costs a worker, and Redis, per answer.

    .venv/bin/python -m bench.impression_cost [--impressions 20000] [--items 10]

The serving benchmark (``bench/serving.py`` with and without
``--setting impressions_enabled=0``) measures the whole effect over HTTP, but on a shared
two-core machine its run-to-run spread is larger than the effect. This measures the parts
directly, against the local Redis under a private prefix:

- ``record``: what ``/recommend`` pays on its own path: ``ImpressionLog.record`` building
  the entry and queueing it (CPU µs per answer);
- the write behind it: the background task writing the queue, one script per batch, at
  batch 1 (a lone request) and 32 (under load), as the worker's CPU µs per impression
  (the event loop's share: what it takes from other requests) and Redis's (its
  ``commandstats`` for the script, per impression);
- the Redis memory of one impression's keys (its stream entry and attribution hash).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.experiments import NO_ASSIGNMENT  # noqa: E402
from service.feedback_store import FeedbackStore  # noqa: E402
from service.impressions import ImpressionLog  # noqa: E402
from service.metrics import Metrics  # noqa: E402


def answer(items: int) -> dict:
    """A /recommend payload of ``items`` items, as the route hands it to the log."""
    return {
        "items": [
            {"item_id": str(1000 + i), "score": 1.0 / (i + 1), "retrieval_score": 0.5}
            for i in range(items)
        ],
        "bundle": "bench-bundle",
        "encoder": "sasrec",
        "reranked": True,
    }


async def script_usec(client) -> tuple[int, float]:
    """Calls and total µs of Redis's script commands so far (EVALSHA and EVAL)."""
    stats = await client.info("commandstats")
    calls = usec = 0
    for name in ("cmdstat_evalsha", "cmdstat_eval"):
        calls += stats.get(name, {}).get("calls", 0)
        usec += stats.get(name, {}).get("usec", 0)
    return calls, usec


async def measure(args) -> dict:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(args.redis_url)
    prefix = f"impbench{uuid.uuid4().hex[:8]}"
    store = FeedbackStore(client, prefix, "bench", window=3600, stream_cap=args.impressions * 2)
    payload = answer(args.items)
    result: dict = {"impressions": args.impressions, "items": args.items}
    try:
        unwritten = ImpressionLog(
            store, capacity=args.impressions, metrics=Metrics(), linger_seconds=0
        )
        started = time.process_time()
        for i in range(args.impressions):
            unwritten.record(
                request_id=uuid.uuid4().hex, user=f"u{i}", assignment=NO_ASSIGNMENT, answer=payload
            )
        record_us = (time.process_time() - started) / args.impressions * 1e6
        await unwritten.close(timeout=0)  # only the queueing was measured: write nothing
        result["record_cpu_us"] = record_us
        for batch in (1, 32):
            # The real writer: each round queues a batch, then waits until it is written.
            log = ImpressionLog(
                store, capacity=args.impressions, metrics=Metrics(), linger_seconds=0
            )
            rounds = args.impressions // batch // (4 if batch == 1 else 1)
            calls, usec = await script_usec(client)
            cpu, wall = time.process_time(), time.perf_counter()
            for r in range(rounds):
                for i in range(batch):
                    rid = uuid.uuid4().hex
                    user = f"u{r * batch + i}"
                    log.record(request_id=rid, user=user, assignment=NO_ASSIGNMENT, answer=payload)
                await log.flush(timeout=10)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            await log.close()
            calls_after, usec_after = await script_usec(client)
            n = rounds * batch
            result[f"batch_{batch}"] = {
                "worker_cpu_us_per_impression": cpu / n * 1e6 - record_us,
                "wall_us_per_impression": wall / n * 1e6,
                "redis_us_per_impression": (usec_after - usec) / n,
                "script_calls": calls_after - calls,
                "dropped": sum(
                    s.value for m in log.metrics.impressions_dropped.collect() for s in m.samples
                ),
            }
        shown = await client.memory_usage(store.shown_key(rid), samples=0)
        stream = await client.memory_usage(store.stream_key, samples=0)
        entries = await client.xlen(store.stream_key)
        result["memory_bytes"] = {
            "attribution_hash": shown,
            "stream_per_entry": stream / max(entries, 1),
        }
    finally:
        keys = [k async for k in client.scan_iter(match=f"{{{prefix}:*", count=1000)]
        for lo in range(0, len(keys), 1000):
            await client.delete(*keys[lo : lo + 1000])
        await client.aclose()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impressions", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=10, help="items per answer")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    result = asyncio.run(measure(args))
    text = json.dumps(result, indent=2)
    sys.stdout.write(text + "\n")
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

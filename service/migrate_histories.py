"""Convert every history of the old layout (one sorted set per user) into the new one.

    RECSERVE_REDIS_URL=redis://... RECSERVE_KEY_PREFIX=recserve python -m service.migrate_histories

Safe to run while the service serves, and again after an interruption: each user is
converted by the same script that appends events (``service.history_store``), from exactly
the members it read, so an event written meanwhile in either layout is kept. Users the
service writes to are converted on their first write anyway; this command converts the
rest, after which no old key is left for reads to merge in. On Redis Cluster
(``redis+cluster://`` URL) one run walks every primary.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from service.cache import RedisBehaviourCache, redis_call, redis_errors
from service.errors import StoreUnavailable
from service.settings import Settings


async def migrate(
    cache: RedisBehaviourCache, concurrency: int = 32, dry_run: bool = False, log=print
) -> dict:
    """Convert every old-layout history under ``cache.prefix``; returns the counts."""
    users = events = scanned = 0
    started = time.perf_counter()
    pending: set[asyncio.Task] = set()

    async def convert(key: bytes) -> int:
        return await cache.convert_legacy(key.decode())

    async def collect(done: set[asyncio.Task]) -> None:
        nonlocal users, events
        for task in done:
            moved = task.result()
            users += moved > 0
            events += moved

    # On a cluster the client's SCAN walks every primary in turn.
    keys = cache.client.scan_iter(match=f"{cache.prefix}:hist:*", count=1000, _type="zset")
    with redis_errors():
        async for key in keys:
            scanned += 1
            if scanned % 100_000 == 0:
                log(f"{scanned} old-layout keys seen, {users} users converted so far")
            if dry_run:
                users += 1
                events += await redis_call(cache.client.zcard(key))
                continue
            pending.add(asyncio.ensure_future(convert(key)))
            if len(pending) >= concurrency:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                await collect(done)
    if pending:
        done, _ = await asyncio.wait(pending)
        await collect(done)
    return {
        "users": users,
        "events": events,
        "seconds": round(time.perf_counter() - started, 3),
        "dry_run": dry_run,
    }


def main(argv: list[str] | None = None) -> int:
    """The command line: settings from ``RECSERVE_*``, as the service reads them."""
    parser = argparse.ArgumentParser(
        prog="python -m service.migrate_histories", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--redis-url", help="default: RECSERVE_REDIS_URL")
    parser.add_argument("--concurrency", type=int, default=32, help="users converted at once")
    parser.add_argument(
        "--dry-run", action="store_true", help="count the old layout's users and events only"
    )
    args = parser.parse_args(argv)
    # The service's own settings, less what only a server needs: the command has no admin
    # endpoints, so no admin token is asked of whoever runs it.
    settings = Settings(admin_enabled=False)

    async def run() -> dict:
        cache = RedisBehaviourCache(
            args.redis_url or settings.redis_url,
            settings.key_prefix,
            settings.history_cap,
            settings.cache_ttl_seconds,
            timeout=max(settings.redis_timeout_seconds, 5.0),
            item_code_cache=settings.item_code_cache,
        )
        try:
            return await migrate(cache, args.concurrency, args.dry_run)
        finally:
            await cache.close()

    try:
        result = asyncio.run(run())
    except StoreUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201 (the command's answer)
        return 1
    verb = "hold" if result["dry_run"] else "converted:"
    print(  # noqa: T201 (the command's answer)
        f"old-layout histories {verb} {result['users']} users, {result['events']} events "
        f"({result['seconds']} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

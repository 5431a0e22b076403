"""The catalogue API's writes in Redis: what every worker of every replica reads.

Keys (prefix ``p``, deployment ``d`` as for the reload channel; one hash tag, so that a
Redis Cluster keeps them in one slot and the write script may touch them all):

- ``{p:catalogue:d}:items`` — a hash, raw item id -> the item's record as JSON
  (:func:`encode_record`): its metadata, availability, optional vectors, or its
  withdrawal;
- ``{p:catalogue:d}:version`` — the catalogue's version, one more per write;
- ``{p:catalogue:d}:changes`` — a sorted set, raw item id -> the version that last wrote
  it, so a worker at version v reads exactly the items written since;
- ``{p:catalogue:d}:announce`` — the channel on which each write publishes its version.

A write is one Lua script (:data:`WRITE`): the version, the records, the change log and
the announcement move together, for one item or a bulk of them, so a reader never sees
half a write and a failed write leaves nothing behind. Every Redis failure surfaces as
``StoreUnavailable``.
"""

from __future__ import annotations

import base64
import json
import logging
import math

import numpy as np

from service.cache import redis_call, redis_errors, run_script
from service.catalogue import ItemRecord

LOG = logging.getLogger(__name__)
RECORD_FORMAT = 1

# KEYS: items, changes, version; ARGV: channel, then raw id and record pairs.
WRITE = """
local version = redis.call('INCR', KEYS[3])
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[2], version, ARGV[i])
end
redis.call('PUBLISH', ARGV[1], version)
return version
"""


def encode_record(record: ItemRecord) -> str:
    """A record as the JSON stored in Redis (vectors as base64 of little-endian float32)."""
    document = {
        "format": RECORD_FORMAT,
        "title": record.title,
        "genres": list(record.genres),
        "attributes": dict(record.attributes),
        "numbers": dict(record.numbers),
        "available": record.available,
        "year": record.year,
        "withdrawn": record.withdrawn,
    }
    if record.vectors:
        document["vectors"] = {
            name: base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii")
            for name, v in record.vectors
        }
        document["vectors_bundle"] = record.vectors_bundle
    return json.dumps(document, separators=(",", ":"))


def decode_record(text: str | bytes) -> ItemRecord:
    """The record stored as ``text``; ValueError for one this version cannot read."""
    document = json.loads(text)
    if not isinstance(document, dict) or document.get("format") != RECORD_FORMAT:
        raise ValueError("not a catalogue record of format 1")
    vectors = tuple(
        (name, np.frombuffer(base64.b64decode(data), dtype="<f4").astype(np.float32))
        for name, data in (document.get("vectors") or {}).items()
    )
    numbers = tuple((k, float(v)) for k, v in document.get("numbers", {}).items())
    if any(not math.isfinite(v) for _, v in numbers):
        raise ValueError("a numeric attribute is not finite")
    return ItemRecord(
        title=document.get("title"),
        genres=tuple(document.get("genres", ())),
        attributes=tuple(sorted(document.get("attributes", {}).items())),
        numbers=tuple(sorted(numbers)),
        available=bool(document.get("available", True)),
        year=document.get("year"),
        vectors=vectors,
        vectors_bundle=document.get("vectors_bundle"),
        withdrawn=bool(document.get("withdrawn", False)),
    )


class CatalogueStore:
    """One deployment's catalogue writes in Redis, through redis-py's asyncio client."""

    def __init__(self, client, prefix: str, deployment: str):
        self.client = client
        tag = f"{{{prefix}:catalogue:{deployment}}}"
        self.items_key = f"{tag}:items"
        self.changes_key = f"{tag}:changes"
        self.version_key = f"{tag}:version"
        self.channel = f"{tag}:announce"
        self._write = client.register_script(WRITE)

    async def write(self, records: dict[str, ItemRecord]) -> int:
        """Store ``records`` (raw id -> record) as one write; the new version."""
        args = [self.channel]
        for raw, record in records.items():
            args += [raw, encode_record(record)]
        keys = [self.items_key, self.changes_key, self.version_key]
        return int(await redis_call(run_script(self._write, keys, args)))

    async def version(self) -> int:
        """The catalogue's current version (0: never written)."""
        return int(await redis_call(self.client.get(self.version_key)) or 0)

    async def changes_since(self, version: int) -> tuple[int, dict[str, ItemRecord]]:
        """The version now and every record written after ``version`` (all of them for 0).

        The version is read first, then the changed ids, in one round trip: every write up
        to that version has completed (a write is one script), so its ids are among them.
        Ids and records of writes made meanwhile may come too, which is harmless: they are
        read again at the next version. (Nothing here needs MULTI, which the asyncio
        cluster client of older redis-py releases lacks.)"""
        with redis_errors():  # entering the pipeline may already ask a cluster its layout
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.get(self.version_key)
                pipe.zrangebyscore(self.changes_key, f"({version}", "+inf")
                now, changed = await pipe.execute()
        now = int(now or 0)
        if not changed:
            return now, {}
        stored = await redis_call(self.client.hmget(self.items_key, changed))
        records = {}
        for raw, text in zip(changed, stored, strict=True):
            raw = raw.decode() if isinstance(raw, bytes) else raw
            if text is None:
                continue
            try:
                records[raw] = decode_record(text)
            except (ValueError, TypeError) as exc:  # written by something else: never served
                LOG.error("catalogue record %r is unreadable (%s); skipped", raw, exc)
        return now, records

    async def listen(self, on_version) -> None:
        """Call ``on_version(version)`` for each announcement heard; returns (or raises)
        when the subscription breaks."""
        async with self.client.pubsub() as pubsub:
            await pubsub.subscribe(self.channel)
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    try:
                        on_version(int(message.get("data")))
                    except (TypeError, ValueError):
                        continue  # not an announcement of ours: the poll still covers us

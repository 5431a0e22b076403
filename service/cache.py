"""Behaviour histories and cached retrievals, in Redis (or in memory for unit tests).

Keys (prefix ``p`` from settings):

- ``{p}:hist:{sha256(user)}`` — a sorted set of the user's events, score = timestamp,
  member = ``"{ts}:{item}"``. Adding an event that is already there adds nothing, so a
  retried ``POST /events`` is harmless; the set is trimmed to the newest ``history_cap``.
  User ids are hashed, so no id (with ``:``, ``*``, spaces...) can name another key.
- ``{p}:ret:{bundle}:{encoder}:{digest}`` — one string holding the user embedding and the
  retrieved candidates (ids and scores) for exactly the encoder input whose digest is in
  the key, with a TTL. A changed history has another digest, so it never meets an old
  entry; a new bundle has another name, so it never meets the old bundle's vectors. One
  string per entry lets a batch of requests read all its entries with one MGET and write
  them in one pipeline (a single HMGET cost many times an MGET slot in redis-py's
  asyncio client, docs/BENCHMARKS.md), and a value that is cut short or of another kind
  reads as a miss.
- ``{p}:reload:{deployment}`` — not a key but the pub/sub channel of reload signals:
  signed "re-read models/CURRENT" messages, one deployment's workers only
  (``service.reload_signals``).

Every Redis failure surfaces as ``StoreUnavailable``; callers decide how to degrade.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from dataclasses import dataclass

import numpy as np

from service.errors import StoreUnavailable

LOG = logging.getLogger(__name__)


@dataclass
class CachedRetrieval:
    """A user embedding and the candidates retrieved for it (best first)."""

    embedding: np.ndarray  # (d,) float32
    ids: np.ndarray  # (depth,) int64 internal item ids
    scores: np.ndarray  # (depth,) float32


def history_digest(item_ids: np.ndarray, time_deltas: np.ndarray) -> str:
    """A digest of exactly what the encoder sees: the padded window of ids and gaps."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(np.ascontiguousarray(item_ids, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(time_deltas, dtype=np.float32).tobytes())
    return digest.hexdigest()


def user_key_part(user_id: str) -> str:
    return hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def history_member(item: str, ts: int) -> str:
    return f"{ts}:{item}"


def _parse_member(member: str | bytes) -> tuple[str, int]:
    text = member.decode() if isinstance(member, bytes) else member
    ts, _, item = text.partition(":")
    return item, int(ts)


class BehaviourCache:
    """Interface of the behaviour store; ``RedisBehaviourCache`` is the real one."""

    def __init__(self, prefix: str, history_cap: int, ttl_seconds: int):
        self.prefix = prefix
        self.history_cap = history_cap
        self.ttl_seconds = ttl_seconds

    def history_key(self, user_id: str) -> str:
        return f"{self.prefix}:hist:{user_key_part(user_id)}"

    def retrieval_key(self, bundle: str, encoder: str, digest: str) -> str:
        return f"{self.prefix}:ret:{bundle}:{encoder}:{digest}"

    async def append_events(self, user_id: str, events: list[tuple[str, int]]) -> int:
        """Add (item, ts) events; returns how many are new and kept.

        An event already stored, or older than a full history's window (trimmed at once),
        does not count, so a retried request reports 0.
        """
        raise NotImplementedError

    async def history(self, user_id: str) -> list[tuple[str, int]]:
        """The stored events of a user, oldest first (ties by item id)."""
        raise NotImplementedError

    async def get_retrievals(self, keys: list[str]) -> list[CachedRetrieval | None]:
        """The entries of ``keys`` (None where there is none), in one round trip."""
        raise NotImplementedError

    async def put_retrievals(self, entries: list[tuple[str, CachedRetrieval]]) -> None:
        """Store (key, entry) pairs with the TTL, in one round trip."""
        raise NotImplementedError

    async def ping(self) -> bool:
        raise NotImplementedError

    async def publish_reload(self, channel: str, message: bytes) -> int:
        """Publish a reload signal (``service.reload_signals``) on ``channel``; returns how
        many listeners got it."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections."""


ENTRY_MAGIC = b"rsr1"
ENTRY_HEADER = struct.Struct("<4sII")  # magic, embedding width, candidate count


def encode_retrieval(value: CachedRetrieval) -> bytes:
    """An entry as one string: header, float32 embedding, int64 ids, float32 scores."""
    embedding = np.ascontiguousarray(value.embedding, dtype=np.float32)
    ids = np.ascontiguousarray(value.ids, dtype=np.int64)
    scores = np.ascontiguousarray(value.scores, dtype=np.float32)
    if len(ids) != len(scores):
        raise ValueError(f"{len(ids)} candidate ids but {len(scores)} scores")
    header = ENTRY_HEADER.pack(ENTRY_MAGIC, len(embedding), len(ids))
    return b"".join((header, embedding.tobytes(), ids.tobytes(), scores.tobytes()))


def decode_retrieval(blob: bytes | None) -> CachedRetrieval | None:
    """The entry in ``blob``; None for a missing, foreign or cut-short value (a miss, never
    a wrong answer)."""
    if blob is None or len(blob) < ENTRY_HEADER.size:
        return None
    magic, width, depth = ENTRY_HEADER.unpack_from(blob)
    if magic != ENTRY_MAGIC or len(blob) != ENTRY_HEADER.size + 4 * width + 12 * depth:
        return None
    at = ENTRY_HEADER.size
    embedding = np.frombuffer(blob, dtype=np.float32, count=width, offset=at)
    ids = np.frombuffer(blob, dtype=np.int64, count=depth, offset=at + 4 * width)
    scores = np.frombuffer(blob, dtype=np.float32, count=depth, offset=at + 4 * width + 8 * depth)
    return CachedRetrieval(embedding, ids, scores)


async def redis_call(operation):
    """Await a redis-py call; every way Redis can be unreachable is ``StoreUnavailable``."""
    import redis.exceptions

    try:
        return await operation
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        raise StoreUnavailable(f"Redis unavailable: {exc}") from exc
    except redis.exceptions.BusyLoadingError as exc:
        raise StoreUnavailable(f"Redis is loading: {exc}") from exc


class RedisBehaviourCache(BehaviourCache):
    """Redis through redis-py's asyncio client (hiredis parser when installed), pooled."""

    def __init__(
        self, url: str, prefix: str, history_cap: int, ttl_seconds: int, timeout: float = 0.25
    ):
        super().__init__(prefix, history_cap, ttl_seconds)
        import redis.asyncio as aioredis

        self.client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=30,
            max_connections=256,
        )

    async def _run(self, operation):
        return await redis_call(operation)

    async def append_events(self, user_id: str, events: list[tuple[str, int]]) -> int:
        key = self.history_key(user_id)
        members = {history_member(item, ts): ts for item, ts in events}
        names = list(members)
        # One transaction: which members were there, add, trim, which are there now.
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.zmscore(key, names)
            pipe.zadd(key, members)
            pipe.zremrangebyrank(key, 0, -(self.history_cap + 1))
            pipe.zmscore(key, names)
            before, _, _, after = await self._run(pipe.execute())
        return sum(b is None and a is not None for b, a in zip(before, after, strict=True))

    async def history(self, user_id: str) -> list[tuple[str, int]]:
        members = await self._run(self.client.zrange(self.history_key(user_id), 0, -1))
        return [_parse_member(m) for m in members]

    async def get_retrievals(self, keys: list[str]) -> list[CachedRetrieval | None]:
        if not keys:
            return []
        return [decode_retrieval(blob) for blob in await self._run(self.client.mget(keys))]

    async def put_retrievals(self, entries: list[tuple[str, CachedRetrieval]]) -> None:
        if not entries:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for key, value in entries:
                pipe.set(key, encode_retrieval(value), ex=self.ttl_seconds)
            await self._run(pipe.execute())

    async def ping(self) -> bool:
        try:
            return bool(await self._run(self.client.ping()))
        except StoreUnavailable:
            return False

    async def publish_reload(self, channel: str, message: bytes) -> int:
        return int(await self._run(self.client.publish(channel, message)))

    async def close(self) -> None:
        await self.client.aclose()


class InMemoryBehaviourCache(BehaviourCache):
    """The same contract in a dict, for unit tests; ``available=False`` simulates an outage."""

    def __init__(self, prefix: str = "test", history_cap: int = 200, ttl_seconds: int = 60):
        super().__init__(prefix, history_cap, ttl_seconds)
        self.histories: dict[str, dict[str, int]] = {}
        self.retrievals: dict[str, bytes] = {}
        self.available = True
        self.published: list[tuple[str, bytes]] = []

    def _check(self) -> None:
        if not self.available:
            raise StoreUnavailable("in-memory store marked unavailable")

    async def append_events(self, user_id: str, events: list[tuple[str, int]]) -> int:
        self._check()
        stored = self.histories.setdefault(self.history_key(user_id), {})
        members = {history_member(item, ts): ts for item, ts in events}
        new = [m for m in members if m not in stored]
        stored.update(members)
        for member in sorted(stored, key=lambda m: (stored[m], m))[: -self.history_cap]:
            del stored[member]
        return sum(m in stored for m in new)

    async def history(self, user_id: str) -> list[tuple[str, int]]:
        self._check()
        stored = self.histories.get(self.history_key(user_id), {})
        return [_parse_member(m) for m in sorted(stored, key=lambda m: (stored[m], m))]

    async def get_retrievals(self, keys: list[str]) -> list[CachedRetrieval | None]:
        self._check()
        return [decode_retrieval(self.retrievals.get(key)) for key in keys]

    async def put_retrievals(self, entries: list[tuple[str, CachedRetrieval]]) -> None:
        self._check()
        for key, value in entries:
            self.retrievals[key] = encode_retrieval(value)

    async def ping(self) -> bool:
        return self.available

    async def publish_reload(self, channel: str, message: bytes) -> int:
        self._check()
        self.published.append((channel, message))
        return 1

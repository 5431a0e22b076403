"""Behaviour histories and cached retrievals, in Redis (or in memory for unit tests).

Keys (prefix ``p`` from settings):

- ``{p}:hp:{{p}:hist:{sha256(user)}}`` — the user's history: one string holding a record
  per event, ordered by time (``service.history_store`` has the layout). Adding an event
  that is already there adds nothing, so a retried ``POST /events`` is harmless; the
  history is trimmed to the newest ``history_cap``. User ids are hashed, so no id (with
  ``:``, ``*``, spaces...) can name another key. The braces hold the old layout's key of
  the same user as a Redis Cluster hash tag, so that both share a slot and one script may
  convert the one into the other.
- ``{p}:hist:{sha256(user)}`` — the old layout (a sorted set of ``"{ts}:{item}"``
  members, score = timestamp): still read, merged into the new key on the user's next
  write or by ``python -m service.migrate_histories``.
- ``{p}:itemcodes`` — the item dictionary: each item id's code in the histories, and back.
- ``{p}:ret:{bundle}:{encoder}:{digest}`` — one string holding the user embedding and the
  retrieved candidates (ids and scores) for exactly the encoder input whose digest is in
  the key, with a TTL. A changed history has another digest, so it never meets an old
  entry; a new bundle has another name, so it never meets the old bundle's vectors. One
  string per entry lets a batch of requests read all its entries with one MGET and write
  them in one pipeline (a single HMGET cost many times an MGET slot in redis-py's
  asyncio client, docs/BENCHMARKS.md), and a value that is cut short or of another kind
  reads as a miss. On a Redis Cluster the entries of a batch lie in many slots: the read
  is one MGET per slot and the write a pipeline, both sent to the nodes at once.
- ``{p}:reload:{deployment}`` — not a key but the pub/sub channel of reload signals:
  signed "re-read models/CURRENT" messages, one deployment's workers only
  (``service.reload_signals``).

Every script and multi-key command touches one Redis Cluster slot, so the same code serves
one Redis and a cluster (``connect_redis``). Every Redis failure surfaces as
``StoreUnavailable``; callers decide how to degrade.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
import struct
from dataclasses import dataclass

import numpy as np

from service.errors import InvalidField, StoreUnavailable
from service.history_store import (
    APPEND_SCRIPT,
    ASSIGN_SCRIPT,
    FORMAT_VERSION,
    GENERATION_MISMATCH,
    HEADER,
    MAX_CODE,
    MAX_TS,
    NEEDS_LEGACY,
    READ_SCRIPT,
    ItemCodes,
    merge_records,
    pack_history,
    pack_members,
    pack_records,
    unpack_records,
)

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
    """A member of the old layout's sorted set (``{p}:hist:...``)."""
    return f"{ts}:{item}"


def parse_history_member(member: str | bytes) -> tuple[str, int]:
    """The (item, ts) of a member of the old layout's sorted set."""
    text = member.decode() if isinstance(member, bytes) else member
    ts, _, item = text.partition(":")
    return item, int(ts)


def _encode_item(item: str) -> bytes:
    # surrogatepass: an id that JSON gave with a lone surrogate is still one id to store.
    return item.encode("utf-8", "surrogatepass")


def _decode_item(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogatepass")


def _check_timestamps(events: list[tuple[str, int]]) -> None:
    for position, (_, ts) in enumerate(events):
        if not 0 <= ts <= MAX_TS:
            raise InvalidField(f"events[{position}].ts: {ts} lies outside 0..2**48-1")


def _legacy_events(key: str, members: list[bytes]) -> list[tuple[str, int]]:
    """The events of the old layout's members; a malformed one is left out, with a warning."""
    events = []
    for member in members:
        try:
            events.append(parse_history_member(member))
        except ValueError:
            LOG.warning("dropping a malformed member of %s: %r", key, member[:80])
    return events


def _in_order(events: list[tuple[str, int]], cap: int) -> list[tuple[str, int]]:
    """Events oldest first, ties by item id, the newest ``cap`` of them."""
    return sorted(events, key=lambda event: (event[1], event[0]))[-cap:]


class BehaviourCache:
    """Interface of the behaviour store; ``RedisBehaviourCache`` is the real one."""

    def __init__(self, prefix: str, history_cap: int, ttl_seconds: int):
        self.prefix = prefix
        self.history_cap = history_cap
        self.ttl_seconds = ttl_seconds

    def history_key(self, user_id: str) -> str:
        """The key of the user's history."""
        return self.packed_key(self.legacy_history_key(user_id))

    def legacy_history_key(self, user_id: str) -> str:
        """The user's key in the old layout (a sorted set), read until converted."""
        return f"{self.prefix}:hist:{user_key_part(user_id)}"

    @staticmethod
    def packed_key(legacy_key: str) -> str:
        """The history key of the user whose old layout's key is ``legacy_key``."""
        prefix = legacy_key.partition(":")[0]
        return f"{prefix}:hp:{{{legacy_key}}}"

    def item_dictionary_key(self) -> str:
        return f"{self.prefix}:itemcodes"

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


# Tries of one append: each retry follows a history that changed under it (a worker of the
# old layout writing it, the item dictionary replaced), which takes a rare coincidence.
APPEND_ATTEMPTS = 5


CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://`` or ``rediss+cluster://``)."""
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


def _host_port(address: str) -> tuple[str, int]:
    host, colon, port = address.rpartition(":")
    if not colon or host.endswith(":"):  # no port, or a bare IPv6 address
        return address.strip("[]"), 6379
    return host.strip("[]"), int(port)


def connect_redis(url: str, *, timeout: float = 5.0, **options):
    """redis-py's asyncio client of ``url``: one server for ``redis://`` and ``rediss://``
    (TLS), a Redis Cluster for ``redis+cluster://`` and ``rediss+cluster://`` (the host and
    port of a node, or of several separated by commas,
    ``redis+cluster://:PASSWORD@h1:6379,h2:6379/0``: the client learns the whole cluster
    from the first that answers, so a start succeeds while one of them is down, and
    follows failovers). Both clients take the same commands; a cluster answers a command
    whose keys lie in several slots with an error, so the stores keep what one command or
    script touches in one slot.

    ``timeout`` bounds each connect and each reply; ``options`` go to the client (for a
    cluster, ``max_connections`` counts per node)."""
    scheme, _, rest = url.partition("://")
    options = {"socket_timeout": timeout, "socket_connect_timeout": timeout, **options}
    if scheme.lower() in CLUSTER_SCHEMES:
        from redis.asyncio.cluster import ClusterNode, RedisCluster
        from redis.asyncio.retry import Retry
        from redis.backoff import ConstantBackoff

        options.pop("health_check_interval", None)  # the cluster client has no such option
        # redis-py's default (ten retries, backing off to a second) would hold a request
        # for seconds while a primary is down; two retries ``timeout`` apart still follow a
        # topology refresh, and the caller's own answer (503, the popularity fallback)
        # comes within about a second.
        options.setdefault("retry", Retry(ConstantBackoff(timeout), 2))
        # Slots whose primary is down fail on their own; the others keep serving.
        options.setdefault("require_full_coverage", False)
        netloc, slash, path = rest.partition("/")
        credentials, at, hosts = netloc.rpartition("@")
        first, *others = hosts.split(",")
        if others:
            # Built again with the URL's credentials and TLS by the client.
            options["startup_nodes"] = [ClusterNode(*_host_port(host)) for host in others]
        seed = f"{CLUSTER_SCHEMES[scheme.lower()]}://{credentials}{at}{first}{slash}{path}"
        return RedisCluster.from_url(seed, **options)
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(url, **options)


async def run_script(script, keys: list, args: list):
    """Run a registered script (redis-py's ``register_script``) by its digest, and by its
    text where the node lacks it (a promoted replica, a restarted or new node): EVAL
    caches it on the node that runs it. (redis-py's own fallback loads it with SCRIPT
    LOAD, which a cluster client sends to every primary and which fails while one is
    down, even for keys that live elsewhere.)"""
    import redis.exceptions

    client = script.registered_client
    try:
        return await client.evalsha(script.sha, len(keys), *keys, *args)
    except redis.exceptions.NoScriptError:
        return await client.eval(script.script, len(keys), *keys, *args)


async def redis_call(operation):
    """Await a redis-py call; every way Redis can be unreachable is ``StoreUnavailable``."""
    with redis_errors():
        return await operation


@contextlib.contextmanager
def redis_errors():
    """Every way Redis (one server or a cluster) can be unreachable, raised inside the
    block, becomes ``StoreUnavailable``."""
    import redis.exceptions

    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        raise StoreUnavailable(f"Redis unavailable: {exc}") from exc
    except redis.exceptions.BusyLoadingError as exc:
        raise StoreUnavailable(f"Redis is loading: {exc}") from exc
    except (
        redis.exceptions.ClusterDownError,
        redis.exceptions.SlotNotCoveredError,
        redis.exceptions.TryAgainError,
        redis.exceptions.ReadOnlyError,
    ) as exc:
        # A failover under way: the keys' primary is down or was just replaced.
        raise StoreUnavailable(f"Redis cannot serve the keys now: {exc}") from exc
    except redis.exceptions.RedisClusterException as exc:
        unreachable = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
        if isinstance(exc.__cause__, unreachable):
            # No node of the cluster answered the client's topology request.
            raise StoreUnavailable(f"Redis unavailable: {exc}") from exc
        raise


class RedisBehaviourCache(BehaviourCache):
    """Redis through redis-py's asyncio client (hiredis parser when installed), pooled."""

    def __init__(
        self,
        url: str,
        prefix: str,
        history_cap: int,
        ttl_seconds: int,
        timeout: float = 0.25,
        *,
        item_code_cache: int = 100_000,
        wait_replicas: int = 0,
        wait_ms: int = 100,
    ):
        super().__init__(prefix, history_cap, ttl_seconds)
        self.cluster = is_cluster_url(url)
        self.client = connect_redis(
            url, timeout=timeout, health_check_interval=30, max_connections=256
        )
        self.codes = ItemCodes(item_code_cache)
        # History writes (and the item codes they use) acknowledged only once this many
        # replicas hold them (Redis WAIT, at most ``wait_ms``); 0: once the primary does.
        self.wait_replicas = wait_replicas
        self.wait_ms = wait_ms
        self._assign_script = self.client.register_script(ASSIGN_SCRIPT)
        self._append_script = self.client.register_script(APPEND_SCRIPT)
        self._read_script = self.client.register_script(READ_SCRIPT)

    async def _run(self, operation):
        return await redis_call(operation)

    async def append_events(self, user_id: str, events: list[tuple[str, int]]) -> int:
        if not events:
            return 0
        _check_timestamps(events)
        return await self._append(self.legacy_history_key(user_id), events)

    async def _append(
        self,
        legacy_key: str,
        events: list[tuple[str, int]],
        legacy: tuple[list[bytes], list[tuple[str, int]]] | None = None,
    ) -> int:
        """Merge ``events`` (and the old layout's history, which the script asks for when
        it exists) into the history of the user whose old key is ``legacy_key``."""
        key = self.packed_key(legacy_key)
        discard = ""
        refresh = False
        for _ in range(APPEND_ATTEMPTS):
            members, legacy_events = legacy or ([], [])
            items = [item for item, _ in events] + [item for item, _ in legacy_events]
            generation, code_of = await self._codes(items, refresh)
            refresh = False
            reply = await self._write(
                self._append_script,
                keys=[key, legacy_key],
                args=[
                    generation,
                    self.history_cap,
                    discard,
                    -1 if legacy is None else len(members),
                    pack_records([(ts, code_of[item]) for item, ts in legacy_events]),
                    pack_records([(ts, code_of[item]) for item, ts in events]),
                    pack_members(members),
                ],
            )
            status = int(reply[0])
            if status >= 0:
                return status
            if status == NEEDS_LEGACY:
                legacy = await self._read_legacy(legacy_key)
            elif status == GENERATION_MISMATCH:
                stored = int(reply[1])
                current, _ = await self._codes([], refresh=True)
                if current != stored:
                    # Written from codes of a dictionary that is gone: nothing can read it.
                    LOG.warning(
                        "history %s was written under item dictionary generation %d, which "
                        "no longer exists (now %d); it is replaced",
                        key,
                        stored,
                        current,
                    )
                    discard = str(stored)
                refresh = True
        raise StoreUnavailable("a history kept changing while it was converted; try again")

    async def _write(self, script, keys: list[str], args: list):
        """Run a script that writes; with ``wait_replicas``, acknowledged only once that
        many replicas hold what it wrote. Otherwise StoreUnavailable: the write may be on
        the primary alone, and a failover now would lose it (a retry adds nothing twice)."""
        if not self.wait_replicas:
            return await self._run(run_script(script, keys, args))
        import redis.exceptions

        try:
            reply, replicas = await self._run(self._write_and_wait(script, keys, args))
        except redis.exceptions.NoScriptError:  # as run_script does
            reply, replicas = await self._run(self._write_and_wait(script, keys, args, True))
        if replicas < self.wait_replicas:
            raise StoreUnavailable(
                f"a history write reached {replicas} of {self.wait_replicas} replicas "
                f"within {self.wait_ms} ms (RECSERVE_HISTORY_WAIT_REPLICAS); try again"
            )
        return reply

    async def _write_and_wait(
        self, script, keys: list[str], args: list, by_text: bool = False
    ) -> list:
        """The script's reply and WAIT's count of replicas, sent on one connection to the
        keys' primary (WAIT counts the writes of its own connection)."""
        run = ("EVAL", script.script) if by_text else ("EVALSHA", script.sha)
        commands = [
            (*run, len(keys), *keys, *args),
            ("WAIT", self.wait_replicas, self.wait_ms),
        ]
        if not self.cluster:
            async with self.client.pipeline(transaction=False) as pipe:  # the caller maps errors
                for command in commands:
                    pipe.execute_command(*command)
                return await pipe.execute()
        # The cluster client's own pipeline would send WAIT to its default node (and on a
        # retry lose the node it was given), so both go down one of the primary's
        # connections, as that pipeline does it.
        import redis.exceptions
        from redis.asyncio.cluster import PipelineCommand

        await self.client.initialize()
        node = self.client.get_node_from_key(keys[0])
        sent = [PipelineCommand(n, *command) for n, command in enumerate(commands)]
        try:
            await node.execute_pipeline(sent)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            await self._refresh_topology()
            raise
        for command in sent:
            if isinstance(command.result, redis.exceptions.AskError):  # MOVED too
                await self._refresh_topology()
                raise StoreUnavailable(f"the history's slot moved (a failover): {command.result}")
            if isinstance(command.result, Exception):
                raise command.result
        return [command.result for command in sent]

    async def _refresh_topology(self) -> None:
        """Have the cluster client ask again which node serves which slots."""
        import redis.exceptions

        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            await self.client.nodes_manager.initialize()

    async def _read_legacy(self, legacy_key: str) -> tuple[list[bytes], list[tuple[str, int]]]:
        """The members of the old layout's key and the events they hold."""
        members = await self._run(self.client.zrange(legacy_key, 0, -1))
        return members, _legacy_events(legacy_key, members)

    async def _codes(self, items: list[str], refresh: bool = False) -> tuple[int, dict[str, int]]:
        """The dictionary's generation and the codes of ``items``, assigned where new; from
        this worker's memory when it holds them all and the generation was confirmed
        lately (``refresh``: confirm it now)."""
        known = self.codes
        wanted = list(dict.fromkeys(items))
        if not refresh and known.fresh():
            code_of = {item: known.code_of.get(item) for item in wanted}
            missing = [item for item, code in code_of.items() if code is None]
            if not missing:
                return known.generation, code_of
        else:
            code_of, missing = {}, wanted
        reply = await self._write(
            self._assign_script,
            keys=[self.item_dictionary_key()],
            args=[secrets.randbelow(MAX_CODE) + 1, *map(_encode_item, missing)],
        )
        generation = int(reply[0])
        if generation != known.generation and len(missing) < len(wanted):
            # The codes remembered belong to a dictionary that is gone: ask for them all.
            known.start(generation)
            return await self._codes(items, refresh=True)
        known.start(generation)
        for item, code in zip(missing, reply[1:], strict=True):
            code_of[item] = int(code)
            known.remember(item, int(code))
        return generation, code_of

    async def convert_legacy(self, legacy_key: str) -> int:
        """Move one user's history from the old layout's key ``legacy_key`` into the new
        layout (merged with whatever the new key holds); returns how many events the old
        key held, 0 where there was none."""
        legacy = await self._read_legacy(legacy_key)
        if not legacy[0]:
            return 0
        await self._append(legacy_key, [], legacy)
        return len(legacy[0])

    async def history(self, user_id: str) -> list[tuple[str, int]]:
        legacy_key = self.legacy_history_key(user_id)
        keys = [self.packed_key(legacy_key), legacy_key]
        reply = await self._run(run_script(self._read_script, keys, []))
        events = await self._decode(reply[0]) if reply[0] else []
        if len(reply) > 1:
            # The old layout's key is still there (not yet converted, or written meanwhile
            # by a worker of the old release): both together are the history.
            legacy = _legacy_events(legacy_key, reply[1])
            return _in_order(list(set(legacy).union(events)), self.history_cap)
        return events

    async def _decode(self, stored: bytes) -> list[tuple[str, int]]:
        """The events of a stored history, oldest first (ties by item id)."""
        version, generation = HEADER.unpack_from(stored)
        if version != FORMAT_VERSION:
            LOG.warning("a history of unknown format %d is read as empty", version)
            return []
        timestamps, codes = unpack_records(stored[HEADER.size :])
        known = self.codes
        events = None
        if generation == known.generation:
            item_of = known.item_of
            try:  # the usual read: this worker knows every code
                events = [(item_of[code], ts) for ts, code in zip(timestamps, codes, strict=True)]
            except KeyError:
                pass
        if events is None:
            events = await self._resolve(generation, timestamps, codes)
        if len(set(timestamps)) < len(timestamps):
            # The records order ties by code; readers are promised item order.
            events.sort(key=lambda event: (event[1], event[0]))
        return events

    async def _resolve(
        self, generation: int, timestamps: list[int], codes: list[int]
    ) -> list[tuple[str, int]]:
        """The events of records whose codes this worker does not all know: the missing
        ones are asked of the dictionary, which must still be of ``generation``."""
        known = self.codes
        cached = known.item_of if generation == known.generation else {}
        unique = set(codes)
        item_of = {code: cached[code] for code in unique if code in cached}
        missing = sorted(unique.difference(item_of))
        reply = await self._run(
            self.client.hmget(
                self.item_dictionary_key(), ["gen", *(f"#{code}" for code in missing)]
            )
        )
        current = None if reply[0] is None else int(reply[0])
        if current is not None:
            known.start(current)
        if current != generation:
            LOG.warning(
                "a history of item dictionary generation %d is read as empty: the "
                "dictionary is now of generation %s",
                generation,
                current,
            )
            return []
        for code, raw in zip(missing, reply[1:], strict=True):
            if raw is not None:
                item_of[code] = _decode_item(raw)
                known.remember(item_of[code], code)
        events = [(item_of.get(code), ts) for ts, code in zip(timestamps, codes, strict=True)]
        known_events = [event for event in events if event[0] is not None]
        if len(known_events) < len(events):
            LOG.warning(
                "%d events name codes the item dictionary lacks; they are left out",
                len(events) - len(known_events),
            )
        return known_events

    async def get_retrievals(self, keys: list[str]) -> list[CachedRetrieval | None]:
        if not keys:
            return []
        # A batch's entries lie in many slots: on a cluster, one MGET per slot, sent to
        # each node in one pipeline, the nodes at once.
        read = self.client.mget_nonatomic if self.cluster else self.client.mget
        return [decode_retrieval(blob) for blob in await self._run(read(keys))]

    async def put_retrievals(self, entries: list[tuple[str, CachedRetrieval]]) -> None:
        if not entries:
            return
        # Entering the pipeline may already ask a cluster for its layout.
        with redis_errors():
            async with self.client.pipeline(transaction=False) as pipe:
                for key, value in entries:
                    pipe.set(key, encode_retrieval(value), ex=self.ttl_seconds)
                await pipe.execute()

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

    GENERATION = 1

    def __init__(self, prefix: str = "test", history_cap: int = 200, ttl_seconds: int = 60):
        super().__init__(prefix, history_cap, ttl_seconds)
        self.histories: dict[str, bytes] = {}  # history key -> stored history
        self.code_of: dict[str, int] = {}  # the item dictionary
        self.item_of: dict[int, str] = {}
        self.retrievals: dict[str, bytes] = {}
        self.available = True
        self.published: list[tuple[str, bytes]] = []

    def _check(self) -> None:
        if not self.available:
            raise StoreUnavailable("in-memory store marked unavailable")

    def _code(self, item: str) -> int:
        if item not in self.code_of:
            self.code_of[item] = len(self.code_of) + 1
            self.item_of[self.code_of[item]] = item
        return self.code_of[item]

    async def append_events(self, user_id: str, events: list[tuple[str, int]]) -> int:
        self._check()
        if not events:
            return 0
        _check_timestamps(events)
        key = self.history_key(user_id)
        stored = self.histories.get(key, HEADER.pack(FORMAT_VERSION, self.GENERATION))
        new = pack_records([(ts, self._code(item)) for item, ts in events])
        body, added = merge_records(stored[HEADER.size :], b"", new, self.history_cap)
        self.histories[key] = pack_history(self.GENERATION, body)
        return added

    async def history(self, user_id: str) -> list[tuple[str, int]]:
        self._check()
        stored = self.histories.get(self.history_key(user_id))
        if stored is None:
            return []
        timestamps, codes = unpack_records(stored[HEADER.size :])
        return _in_order(
            [(self.item_of[code], ts) for ts, code in zip(timestamps, codes, strict=True)],
            self.history_cap,
        )

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

"""Impressions, their outcomes and the experiments' counts in Redis.

Keys (prefix ``p``, deployment ``d`` as for the reload channel; one hash tag, so that a
Redis Cluster keeps them in one slot and each script below may touch all it needs):

- ``{p:feedback:d}:impressions`` — a stream, capped near ``RECSERVE_IMPRESSIONS_STREAM_CAP``
  entries: every impression logged (request id, user, experiment, arm, forced, time,
  bundle, retriever, reranked, items with scores), for analyses beyond the counts;
- ``{p:feedback:d}:shown:<request id>`` — a hash, what attribution needs of one impression
  (user, experiment, arm, forced, time, item ids in order) and the outcome marks it has
  earned; it expires after the attribution window;
- ``{p:feedback:d}:user:<digest of the user id>`` — a sorted set, the user's request ids
  by time within the window, for events that name no request;
- ``{p:feedback:d}:experiment:<name>`` — a hash of counts per arm: ``<arm>|impressions``,
  ``<arm>|<type>`` (impressions with at least one attributed event of the type),
  ``<arm>|<type>:events`` (distinct items of the impression the type was attributed to),
  ``<arm>|hit`` (impressions whose first ``hit_k`` items hold a later event of the user).

A batch of impressions is one script (:data:`LOG_IMPRESSIONS`), and so are the outcome
marks with their counts (:data:`MARK_OUTCOMES`): a mark is set once, and only the call
that sets it counts it, so a retried event counts nothing twice and the counts stay exact
whatever fails between calls. Every Redis failure surfaces as ``StoreUnavailable``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from service.cache import redis_call, redis_errors, run_script, user_key_part

# KEYS: the stream, then per impression: its shown hash, its user's set, its experiment's
# counts. ARGV: stream cap, window seconds, the impressions count's name, then 11 values
# per impression (LoggedImpression's fields in order).
LOG_IMPRESSIONS = """
local cap, window = ARGV[1], tonumber(ARGV[2])
local per = 11
for i = 0, (#KEYS - 1) / 3 - 1 do
  local shown, user, counts = KEYS[2 + 3 * i], KEYS[3 + 3 * i], KEYS[4 + 3 * i]
  local a = 4 + per * i
  local rid, uid, exp, arm, forced, t = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3],
    ARGV[a + 4], ARGV[a + 5]
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', cap, '*', 'request_id', rid, 'user', uid,
    'experiment', exp, 'arm', arm, 'forced', forced, 'time', t, 'bundle', ARGV[a + 6],
    'encoder', ARGV[a + 7], 'reranked', ARGV[a + 8], 'items', ARGV[a + 9])
  redis.call('HSET', shown, 'u', uid, 'e', exp, 'a', arm, 'f', forced, 't', t,
    'i', ARGV[a + 10])
  redis.call('EXPIRE', shown, window)
  if uid ~= '' then
    redis.call('ZADD', user, t, rid)
    redis.call('ZREMRANGEBYSCORE', user, '-inf', tonumber(t) - window)
    redis.call('EXPIRE', user, window)
  end
  if forced == '0' then
    redis.call('HINCRBY', counts, arm .. '|' .. ARGV[3], 1)
  end
end
return 0
"""

# KEYS: per mark, the shown hash and its experiment's counts. ARGV: per mark, the mark's
# field and the count it adds to ('' for none). Returns 1 per mark set now, else 0 (set
# before, or the impression has expired: nothing is created for it).
MARK_OUTCOMES = """
local set = {}
for i = 1, #KEYS / 2 do
  local shown, counts = KEYS[2 * i - 1], KEYS[2 * i]
  local field, count = ARGV[2 * i - 1], ARGV[2 * i]
  set[i] = 0
  if redis.call('EXISTS', shown) == 1 and redis.call('HSETNX', shown, field, 1) == 1 then
    set[i] = 1
    if count ~= '' then
      redis.call('HINCRBY', counts, count, 1)
    end
  end
end
return set
"""
SHOWN_FIELDS = ("u", "e", "a", "f", "t", "i")
HIT = "hit"  # the outcome of an impression whose first hit_k items hold a later event
IMPRESSIONS = "impressions"


@dataclass(frozen=True)
class LoggedImpression:
    """An impression as the log script takes it: ``items`` the JSON the stream keeps
    (``[[id, score], ...]``, best first), ``item_ids`` the JSON list of ids alone."""

    request_id: str
    user: str  # '' for a request without a user
    experiment: str
    arm: str
    forced: bool
    time: float
    bundle: str
    encoder: str
    reranked: bool
    items: str
    item_ids: str


@dataclass(frozen=True)
class Shown:
    """What attribution reads of an impression."""

    request_id: str
    user: str
    experiment: str
    arm: str
    forced: bool
    time: float
    items: tuple[str, ...]


@dataclass(frozen=True)
class Mark:
    """An outcome an impression has earned: ``outcome`` an event type or ``"hit"``;
    with ``item`` the mark of one item the type was attributed to."""

    shown: Shown
    outcome: str
    item: str | None = None

    @property
    def field(self) -> str:
        if self.item is not None:
            return f"e:{self.outcome}:{self.item}"
        return self.outcome if self.outcome == HIT else f"o:{self.outcome}"

    @property
    def count(self) -> str | None:
        """The experiment's count it adds to when new (None: forced, counts nothing)."""
        if self.shown.forced:
            return None
        return f"{self.shown.arm}|{self.outcome}" + (":events" if self.item is not None else "")


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


class FeedbackStore:
    """One deployment's impressions, outcome marks and experiment counts in Redis."""

    def __init__(self, client, prefix: str, deployment: str, *, window: int, stream_cap: int):
        self.client = client
        self.tag = f"{{{prefix}:feedback:{deployment}}}"
        self.stream_key = f"{self.tag}:impressions"
        self.window = window
        self.stream_cap = stream_cap
        self._log = client.register_script(LOG_IMPRESSIONS)
        self._mark = client.register_script(MARK_OUTCOMES)

    def shown_key(self, request_id: str) -> str:
        return f"{self.tag}:shown:{request_id}"

    def user_key(self, user: str) -> str:
        return f"{self.tag}:user:{user_key_part(user)}"

    def counts_key(self, experiment: str) -> str:
        return f"{self.tag}:experiment:{experiment}"

    async def log(self, impressions: list[LoggedImpression]) -> None:
        """Store a batch of impressions in one script."""
        keys = [self.stream_key]
        args: list = [self.stream_cap, self.window, IMPRESSIONS]
        for imp in impressions:
            keys += [self.shown_key(imp.request_id), self.user_key(imp.user)]
            keys.append(self.counts_key(imp.experiment))
            args += [imp.request_id, imp.user, imp.experiment, imp.arm, int(imp.forced)]
            args += [repr(imp.time), imp.bundle, imp.encoder, int(imp.reranked), imp.items]
            args.append(imp.item_ids)
        await redis_call(run_script(self._log, keys, args))

    async def shown(self, request_ids: list[str]) -> list[Shown | None]:
        """The impressions of ``request_ids`` still within the window (None for others)."""
        if not request_ids:
            return []
        with redis_errors():  # entering the pipeline may already ask a cluster its layout
            async with self.client.pipeline(transaction=False) as pipe:
                for rid in request_ids:
                    pipe.hmget(self.shown_key(rid), SHOWN_FIELDS)
                rows = await pipe.execute()
        found: list[Shown | None] = []
        for rid, (user, exp, arm, forced, at, items) in zip(request_ids, rows, strict=True):
            if at is None:
                found.append(None)
                continue
            found.append(
                Shown(
                    request_id=rid,
                    user=_text(user),
                    experiment=_text(exp),
                    arm=_text(arm),
                    forced=_text(forced) == "1",
                    time=float(at),
                    items=tuple(json.loads(items)),
                )
            )
        return found

    async def recent(self, users: list[str], since: float, until: float) -> list[list[str]]:
        """Each user's request ids shown between ``since`` and ``until`` (Unix seconds)."""
        with redis_errors():
            async with self.client.pipeline(transaction=False) as pipe:
                for user in users:
                    pipe.zrangebyscore(self.user_key(user), since, until)
                rows = await pipe.execute()
        return [[_text(rid) for rid in row] for row in rows]

    async def mark(self, marks: list[Mark]) -> list[bool]:
        """Set each mark once; True for those set by this call (and counted by it)."""
        if not marks:
            return []
        keys, args = [], []
        for mark in marks:
            keys += [self.shown_key(mark.shown.request_id), self.counts_key(mark.shown.experiment)]
            args += [mark.field, mark.count or ""]
        return [bool(flag) for flag in await redis_call(run_script(self._mark, keys, args))]

    async def counts(self, experiment: str) -> dict[str, int]:
        """The experiment's counts (field -> count)."""
        stored = await redis_call(self.client.hgetall(self.counts_key(experiment)))
        return {_text(k): int(v) for k, v in stored.items()}

    async def experiments(self) -> list[str]:
        """The names of the experiments with counts, sorted."""
        prefix = self.counts_key("")
        with redis_errors():  # on a cluster the scan walks every primary
            names = [
                _text(key)[len(prefix) :]
                async for key in self.client.scan_iter(match=f"{prefix}*", count=1000)
            ]
        return sorted(names)

"""The traffic a load test sends: requests drawn from real per-user histories.

Shared by the load generator (``python -m bench.loadgen``) and bench/locustfile.py, so
both send the same mix: /events continuing a user's history, /recommend with a history
window (some of them repeats of an earlier body) or with only a ``user_id`` whose events
the service acknowledged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from training.data import SequenceData, build_sequences
from training.datasets import load_dataset

RECOMMEND = "/recommend"
EVENTS = "/events"
ENDPOINTS = (RECOMMEND, EVENTS)
KINDS = ("history", "user_id", "events")
CACHE_VALUES = ("hit", "miss", "bypass")  # the /recommend ``cache`` field
SEED_BATCH = 100  # events per /events call while seeding (the service accepts 1000)
JSON_HEADERS = {"content-type": "application/json"}


@dataclass(kw_only=True)
class TrafficMix:
    """What the traffic looks like."""

    events_share: float = 0.1  # of all requests: POST /events
    user_id_share: float = 0.2  # of /recommend: user_id only, history read from Redis
    repeat_share: float = 0.3  # of /recommend with a history: an earlier body sent again
    max_history: int = 50  # events in a history request, at most
    min_history: int = 1
    events_batch: int = 1  # events per /events request (1: a single object, not a list)
    seed_users: int = 100  # users whose history is stored before the run (for user_id)
    k: int = 10
    encoder: str | None = None
    user_prefix: str = "loadgen-"
    repeat_pool: int = 10_000  # distinct earlier history bodies kept for repeats
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("events_share", "user_id_share", "repeat_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if self.min_history < 1 or self.max_history < self.min_history:
            raise ValueError("need 1 <= min_history <= max_history")
        if self.events_batch < 1 or self.k < 1 or self.repeat_pool < 1 or self.seed_users < 0:
            raise ValueError("events_batch, k and repeat_pool must be >= 1, seed_users >= 0")


@dataclass
class PlannedRequest:
    """One request to send: endpoint, serialised JSON body, and what it stands for."""

    endpoint: str
    kind: str  # history, user_id, events or seed
    body: bytes
    repeat: bool = False
    user: int = -1  # the dataset's user index (events: whose history it extends)

    def json(self):
        return json.loads(self.body)


def _dumps(payload) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


class TrafficSampler:
    """Draws requests from real per-user histories (``SequenceData``), seeded.

    Not thread-safe; one per event loop (or per Locust process, where greenlets take
    turns) is the intended use.
    """

    def __init__(self, data: SequenceData, mix: TrafficMix | None = None):
        self.data = data
        self.mix = mix or TrafficMix()
        self._rng = np.random.default_rng(self.mix.seed)
        lengths = data.lengths
        self._eligible = np.flatnonzero(lengths >= self.mix.min_history)
        if len(self._eligible) == 0:
            raise ValueError(f"no user has {self.mix.min_history} or more events")
        self._raw_users = data.user_map.raw
        self._raw_items = data.item_map.raw
        self._cursor: dict[int, int] = {}  # user -> next event (index into data.items) to post
        self._stored: list[int] = []  # users with acknowledged events, for user_id requests
        self._stored_set: set[int] = set()
        self._pool: list[PlannedRequest] = []  # earlier history requests, for repeats

    @classmethod
    def from_spec(cls, spec: str, mix: TrafficMix | None = None) -> TrafficSampler:
        """Load a data spec (``synthetic``, ``ml-1m:PATH``, ...) and sample from it."""
        return cls(build_sequences(load_dataset(spec)), mix)

    # -- identities and events

    def user_id(self, user: int) -> str:
        return f"{self.mix.user_prefix}{self._raw_users[user + 1]}"

    def events(self, user: int, start: int, end: int) -> list[dict]:
        """Events ``start:end`` (indices into ``data.items``) as the API's objects."""
        items = self._raw_items[self.data.items[start:end]].tolist()
        times = self.data.timestamps[start:end].tolist()
        return [{"item_id": item, "ts": ts} for item, ts in zip(items, times, strict=True)]

    @property
    def stored_users(self) -> list[int]:
        return list(self._stored)

    def mark_stored(self, request: PlannedRequest) -> None:
        """The service acknowledged ``request`` (events): its user can be asked by user_id."""
        if request.user >= 0 and request.user not in self._stored_set:
            self._stored_set.add(request.user)
            self._stored.append(request.user)

    # -- drawing

    def seed_requests(self) -> list[PlannedRequest]:
        """/events calls storing the first half of ``seed_users`` users' histories.

        Later ``events`` requests for these users continue from there. Send them before the
        run and call :meth:`mark_stored` for each acknowledged one.
        """
        count = min(self.mix.seed_users, len(self._eligible))
        users = self._rng.choice(self._eligible, size=count, replace=False) if count else []
        planned = []
        for user in sorted(int(u) for u in users):
            start, end = int(self.data.offsets[user]), int(self.data.offsets[user + 1])
            split = start + max(1, (end - start) // 2)
            self._cursor[user] = split
            for first in range(start, split, SEED_BATCH):
                last = min(split, first + SEED_BATCH)
                body = [
                    {"user_id": self.user_id(user), **event}
                    for event in self.events(user, first, last)
                ]
                planned.append(PlannedRequest(EVENTS, "seed", _dumps(body), user=user))
        return planned

    def next(self) -> PlannedRequest:
        """The next request of the mix."""
        mix = self.mix
        if self._rng.random() < mix.events_share:
            return self._events_request()
        if self._stored and self._rng.random() < mix.user_id_share:
            user = self._stored[int(self._rng.integers(len(self._stored)))]
            return PlannedRequest(RECOMMEND, "user_id", self._recommend_body(user), user=user)
        if self._pool and self._rng.random() < mix.repeat_share:
            earlier = self._pool[int(self._rng.integers(len(self._pool)))]
            return PlannedRequest(RECOMMEND, "history", earlier.body, True, earlier.user)
        return self._history_request()

    def _recommend_body(self, user: int, history: list[dict] | None = None) -> bytes:
        body: dict = {"user_id": self.user_id(user)}
        if history is not None:
            body["history"] = history
        body["k"] = self.mix.k
        if self.mix.encoder:
            body["encoder"] = self.mix.encoder
        return _dumps(body)

    def _history_request(self) -> PlannedRequest:
        mix = self.mix
        user = int(self._eligible[int(self._rng.integers(len(self._eligible)))])
        start, end = int(self.data.offsets[user]), int(self.data.offsets[user + 1])
        stop = int(self._rng.integers(start + mix.min_history, end + 1))  # window end, exclusive
        history = self.events(user, max(start, stop - mix.max_history), stop)
        request = PlannedRequest(
            RECOMMEND, "history", self._recommend_body(user, history), user=user
        )
        if len(self._pool) < mix.repeat_pool:
            self._pool.append(request)
        else:  # keep a uniform sample of the history bodies sent so far
            slot = int(self._rng.integers(len(self._pool)))
            self._pool[slot] = request
        return request

    def _events_request(self) -> PlannedRequest:
        user = int(self._eligible[int(self._rng.integers(len(self._eligible)))])
        start, end = int(self.data.offsets[user]), int(self.data.offsets[user + 1])
        first = self._cursor.get(user, start)
        if first >= end:  # history used up: send its last event again, as a retrying client
            first = end - 1
        last = min(end, first + self.mix.events_batch)
        self._cursor[user] = last
        events = [{"user_id": self.user_id(user), **e} for e in self.events(user, first, last)]
        payload = events[0] if self.mix.events_batch == 1 else events
        return PlannedRequest(EVENTS, "events", _dumps(payload), user=user)

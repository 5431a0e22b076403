"""Load generator for a running recserve deployment: realistic traffic, latency percentiles.

    .venv/bin/python bench/loadgen.py --url http://127.0.0.1:8000 --data synthetic \
        --concurrency 16 --requests 20000 --duration 60 --out result.json --plot latency.png
    .venv/bin/python bench/loadgen.py --url http://127.0.0.1:8000 --rate 200 --duration 30

(``python -m bench.loadgen`` works too). It talks only to the ``--url`` it is given.

Traffic. Histories are drawn from a dataset (``--data``: any spec that
``training.data.load_dataset`` understands; use the data the served bundle was trained
on, or most items are unknown to it). Each request is one of

- ``events`` (share ``--events-share``): POST /events with the next ``--events-batch``
  events of a user's real history, continuing where that user's stored history stops;
- ``user_id``  (share ``--user-id-share`` of /recommend): POST /recommend with only a
  ``user_id``; the service reads the history from Redis. Only users whose events the
  service acknowledged are asked for, so before the run ``--seed-users`` users get the
  first half of their history posted to /events (not measured). Without any stored user
  these requests fall back to carrying a history;
- ``history`` (the rest of /recommend): a ``user_id`` and a chronological window of at
  most ``--max-history`` consecutive events of that user, ending at a random point of
  their history. A share ``--repeat-share`` of these are repeats: the exact body of an
  earlier history request, sent again, which is what exercises the embedding cache.

User ids sent are ``--user-prefix`` + the dataset's raw user id, so load-test users do not
mix with real ones in Redis. The draws are seeded: ``--seed`` replays a run's requests
(the seed is in the result), but against a warm cache a replay finds every history it
sent before already cached, so the CLI draws a fresh seed unless one is given.

Modes. ``--concurrency N`` (default): a closed loop, N workers each sending the next
request as soon as the last one answered. ``--rate R``: an open loop, arrivals at R per
second (``--arrivals poisson`` or ``uniform``) whatever the latency; at most
``--max-in-flight`` requests are outstanding and an arrival that finds them all busy is
dropped and counted (``dropped``), so a saturated target shows up instead of silently
slowing the schedule. Either way the run stops after ``--requests`` requests (arrivals,
in the open loop) or ``--duration`` seconds, whichever comes first; requests in flight
at that moment are awaited (they are bounded by ``--timeout``).

Measures. Throughput; latency count/mean/p50/p95/p99/max overall and per endpoint, over
every request that got an HTTP response (errors included, as a client sees them;
timeouts and connection errors have no latency); errors by status code and by exception
type; the /recommend ``cache`` field (hit/miss/bypass and the hit ratio) and ``fallback``;
a per-second timeline (completions, p50, p99, errors). A progress line goes to stderr
about once a second; a summary to stdout; ``--out`` writes the JSON result and ``--plot``
a PNG of latency and throughput over time. The CLI first checks that GET /healthz answers
(``--no-check`` skips it) and exits 1 when no request succeeded.

One Python process sends a few thousand small requests per second at most on one core;
when the loadgen's own CPU is saturated, latencies include its queueing. Run it on
another machine than the service, or several copies, for higher rates.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import platform
import secrets
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.data import DataError, SequenceData, build_sequences  # noqa: E402
from training.datasets import load_dataset  # noqa: E402

LOG = logging.getLogger("bench.loadgen")

DEFAULT_URL = "http://127.0.0.1:8000"
RECOMMEND = "/recommend"
EVENTS = "/events"
ENDPOINTS = (RECOMMEND, EVENTS)
KINDS = ("history", "user_id", "events")
CACHE_VALUES = ("hit", "miss", "bypass")
PERCENTILES = (50, 95, 99)
SEED_BATCH = 100  # events per /events call while seeding (the service accepts 1000)
JSON_HEADERS = {"content-type": "application/json"}


# --------------------------------------------------------------------------- traffic


@dataclass
class TrafficMix:
    """What the traffic looks like; shared by this CLI and bench/locustfile.py."""

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


# --------------------------------------------------------------------------- statistics


@dataclass
class Measurements:
    """One row per finished request, appended as they finish (times in seconds)."""

    started: list[float] = field(default_factory=list)  # since the run began
    latency: list[float] = field(default_factory=list)
    endpoint: list[str] = field(default_factory=list)
    kind: list[str] = field(default_factory=list)
    repeat: list[bool] = field(default_factory=list)
    status: list[int] = field(default_factory=list)  # 0: no response (see error)
    error: list[str | None] = field(default_factory=list)  # exception type name
    cache: list[str | None] = field(default_factory=list)
    fallback: list[str | None] = field(default_factory=list)

    def add(
        self,
        request: PlannedRequest,
        started: float,
        latency: float,
        status: int,
        error: str | None = None,
        cache: str | None = None,
        fallback: str | None = None,
    ) -> None:
        self.started.append(started)
        self.latency.append(latency)
        self.endpoint.append(request.endpoint)
        self.kind.append(request.kind)
        self.repeat.append(request.repeat)
        self.status.append(status)
        self.error.append(error)
        self.cache.append(cache)
        self.fallback.append(fallback)

    def __len__(self) -> int:
        return len(self.status)


def latency_summary(latencies_s) -> dict:
    """count, mean, p50/p95/p99 (numpy's linear interpolation) and max, in milliseconds."""
    values = np.asarray(latencies_s, dtype=np.float64)
    keys = ["mean_ms", *(f"p{p}_ms" for p in PERCENTILES), "max_ms"]
    if values.size == 0:
        return {"count": 0, **dict.fromkeys(keys)}
    quantiles = np.percentile(values, PERCENTILES) * 1000.0
    return {
        "count": int(values.size),
        "mean_ms": float(values.mean() * 1000.0),
        **{f"p{p}_ms": float(q) for p, q in zip(PERCENTILES, quantiles, strict=True)},
        "max_ms": float(values.max() * 1000.0),
    }


def timeline(finished_s, latencies_s, failed, elapsed_s: float) -> list[dict]:
    """Per second of the run (by completion time): completions/s, p50, p99, errors.

    ``latencies_s`` is NaN for requests without a response (left out of the percentiles);
    ``failed`` marks errors of either sort. The last, partial second is scaled to a rate.
    """
    finished = np.asarray(finished_s, dtype=np.float64)
    latencies = np.asarray(latencies_s, dtype=np.float64)
    failed = np.asarray(failed, dtype=bool)
    seconds = max(1, math.ceil(elapsed_s)) if elapsed_s > 0 else 1
    bins = np.clip(np.floor(finished).astype(np.int64), 0, seconds - 1)
    rows = []
    for second in range(seconds):
        here = bins == second
        width = min(1.0, elapsed_s - second) if elapsed_s > second else 1.0
        answered = latencies[here & ~np.isnan(latencies)]
        p50, p99 = (np.percentile(answered, (50, 99)) * 1000.0) if answered.size else (None, None)
        rows.append(
            {
                "second": second,
                "completed": int(here.sum()),
                "rps": float(here.sum() / width) if width > 0 else 0.0,
                "errors": int((here & failed).sum()),
                "p50_ms": None if p50 is None else float(p50),
                "p99_ms": None if p99 is None else float(p99),
            }
        )
    return rows


def summarise(m: Measurements, elapsed_s: float) -> dict:
    """The result's statistics (everything but config and metadata) from the measurements."""
    status = np.asarray(m.status, dtype=np.int64)
    latency = np.asarray(m.latency, dtype=np.float64)
    endpoint = np.asarray(m.endpoint, dtype=object)
    answered = status > 0
    ok = (status >= 200) & (status < 300)
    by_status = Counter(str(s) for s in status[answered & ~ok].tolist())
    by_exception = Counter(e for e in m.error if e is not None)
    completed = len(m)
    latency_ms = {"overall": latency_summary(latency[answered])}
    for name in ENDPOINTS:
        latency_ms[name] = latency_summary(latency[answered & (endpoint == name)])
    recommend_ok = ok & (endpoint == RECOMMEND)
    served_cache = Counter(c for c, keep in zip(m.cache, recommend_ok, strict=True) if keep)
    with_cache = sum(served_cache[v] for v in CACHE_VALUES)
    cache = {v: int(served_cache[v]) for v in CACHE_VALUES}
    other = sum(served_cache.values()) - with_cache  # missing or unexpected values
    cache["other"] = int(other)
    cache["hit_ratio"] = (served_cache["hit"] / with_cache) if with_cache else None
    fallbacks = Counter(f for f, keep in zip(m.fallback, recommend_ok, strict=True) if keep and f)
    finished = np.asarray(m.started, dtype=np.float64) + np.nan_to_num(latency)
    return {
        "elapsed_s": float(elapsed_s),
        "completed": completed,
        "ok": int(ok.sum()),
        "errors": int(completed - ok.sum()),
        "throughput_rps": completed / elapsed_s if elapsed_s > 0 else 0.0,
        "ok_rps": float(ok.sum()) / elapsed_s if elapsed_s > 0 else 0.0,
        "latency_ms": latency_ms,
        "errors_by_status": dict(sorted(by_status.items())),
        "errors_by_exception": dict(sorted(by_exception.items())),
        "cache": cache,
        "fallback": dict(fallbacks),
        "kinds": {k: int(sum(1 for x in m.kind if x == k)) for k in KINDS},
        "repeats": int(sum(m.repeat)),
        "timeline": timeline(finished, np.where(answered, latency, np.nan), ~ok, elapsed_s),
    }


# --------------------------------------------------------------------------- running


@dataclass
class LoadConfig:
    """How hard and how long to push; the traffic itself is a :class:`TrafficMix`."""

    url: str = DEFAULT_URL
    requests: int = 10_000  # at most this many requests (open loop: arrivals)
    duration_s: float = 60.0  # and at most this long
    concurrency: int = 8  # closed loop: workers; also the connection pool size
    rate: float | None = None  # open loop: arrivals per second (None: closed loop)
    max_in_flight: int = 256  # open loop: outstanding requests at most
    arrivals: str = "poisson"  # open loop: poisson or uniform inter-arrival times
    timeout_s: float = 10.0
    progress: bool = True

    def __post_init__(self) -> None:
        self.url = check_url(self.url)
        if self.requests < 1 or self.duration_s <= 0:
            raise ValueError("requests must be >= 1 and duration > 0")
        if self.concurrency < 1 or self.max_in_flight < 1:
            raise ValueError("concurrency and max_in_flight must be >= 1")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be > 0")
        if self.arrivals not in ("poisson", "uniform"):
            raise ValueError("arrivals must be poisson or uniform")

    @property
    def mode(self) -> str:
        return "closed" if self.rate is None else "open"

    @property
    def pool_size(self) -> int:
        return self.concurrency if self.rate is None else self.max_in_flight


def check_url(url: str) -> str:
    """The target exactly as given: an http(s) URL with a host; nothing else is contacted."""
    import httpx

    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ValueError(f"not a URL: {url!r}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"expected http(s)://HOST[:PORT][/PATH], got {url!r}")
    return url.rstrip("/")


def check_reachable(url: str, timeout_s: float) -> str | None:
    """GET {url}/healthz once; a message when the target does not answer 200, else None."""
    import httpx

    try:
        response = httpx.get(f"{url}/healthz", timeout=timeout_s, trust_env=False)
    except httpx.HTTPError as exc:
        return f"{url} does not answer ({type(exc).__name__}: {exc})"
    if response.status_code != 200:
        return f"{url}/healthz answered {response.status_code}"
    return None


class LoadRun:
    """One run against one target: sends, measures, stops by itself."""

    def __init__(
        self,
        config: LoadConfig,
        sampler: TrafficSampler,
        progress_stream: TextIO | None = None,
        observer: Callable[[PlannedRequest, int, object], None] | None = None,
    ):
        self.config = config
        self.sampler = sampler
        # Called with (request, status, response) for each measured request (response None
        # when no answer came): fault runs check acknowledged events and served bundles.
        self.observer = observer
        self.measurements = Measurements()
        self.seed_outcome: dict = {}
        self.dropped = 0
        self.arrivals = 0
        self._progress_stream = progress_stream or sys.stderr
        self._stop = asyncio.Event()
        self._t0 = 0.0

    async def run(self, handle_sigint: bool = False) -> dict:
        import httpx

        config = self.config
        limits = httpx.Limits(
            max_connections=config.pool_size, max_keepalive_connections=config.pool_size
        )
        loop = asyncio.get_running_loop()
        if handle_sigint:
            loop.add_signal_handler(signal.SIGINT, self._stop.set)
        try:
            async with httpx.AsyncClient(
                base_url=config.url,
                limits=limits,
                timeout=config.timeout_s,
                http1=True,
                http2=False,
                trust_env=False,  # no proxy from the environment between us and the target
                headers=JSON_HEADERS,
            ) as client:
                self._client = client
                await self._seed()
                self._t0 = time.perf_counter()
                started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
                reporter = asyncio.create_task(self._report_progress())
                try:
                    if config.rate is None:
                        await self._closed_loop()
                    else:
                        await self._open_loop()
                finally:
                    elapsed = time.perf_counter() - self._t0
                    reporter.cancel()
                    await asyncio.gather(reporter, return_exceptions=True)
                    self._write_progress(final=True)
        finally:
            if handle_sigint:
                loop.remove_signal_handler(signal.SIGINT)
        return self._result(started_at, elapsed)

    # -- sending

    async def _send(self, request: PlannedRequest, record: bool = True) -> int:
        import httpx

        started = time.perf_counter()
        status, error, cache, fallback, response = 0, None, None, None, None
        try:
            response = await self._client.post(request.endpoint, content=request.body)
            status = response.status_code
            if request.endpoint == RECOMMEND and 200 <= status < 300:
                try:
                    payload = response.json()
                    cache, fallback = payload.get("cache"), payload.get("fallback")
                except (ValueError, AttributeError):
                    cache = "unreadable"
            elif request.endpoint == EVENTS and 200 <= status < 300:
                self.sampler.mark_stored(request)
        except (httpx.HTTPError, OSError) as exc:
            error = type(exc).__name__
        latency = time.perf_counter() - started
        if record:
            self.measurements.add(
                request, started - self._t0, latency, status, error, cache, fallback
            )
            if self.observer is not None:
                self.observer(request, status, response)
        return status

    async def _seed(self) -> None:
        """Store seed users' histories (not measured) so user_id requests find them."""
        if self.sampler.mix.user_id_share <= 0:
            return
        planned = self.sampler.seed_requests()
        if not planned:
            return
        slots = asyncio.Semaphore(self.config.pool_size)
        statuses: Counter = Counter()

        async def one(request: PlannedRequest) -> None:
            async with slots:
                statuses[await self._send(request, record=False)] += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(one(r) for r in planned))
        self.seed_outcome = {
            "requests": len(planned),
            "users_stored": len(self.sampler.stored_users),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "seconds": time.perf_counter() - t0,
        }
        if len(self.sampler.stored_users) == 0:
            LOG.warning(
                "no seed user was stored (statuses %s): user_id requests carry a history "
                "until /events succeeds",
                self.seed_outcome["statuses"],
            )

    def _deadline_passed(self) -> bool:
        return self._stop.is_set() or time.perf_counter() - self._t0 >= self.config.duration_s

    async def _closed_loop(self) -> None:
        async def worker() -> None:
            while self.arrivals < self.config.requests and not self._deadline_passed():
                self.arrivals += 1
                await self._send(self.sampler.next())

        await asyncio.gather(*(worker() for _ in range(self.config.concurrency)))

    async def _open_loop(self) -> None:
        config = self.config
        rng = np.random.default_rng(self.sampler.mix.seed + 1)
        interval = 1.0 / config.rate
        in_flight: set[asyncio.Task] = set()
        due = 0.0  # next arrival, seconds since the start
        while self.arrivals < config.requests and not self._stop.is_set():
            if due >= config.duration_s:
                break
            wait = due - (time.perf_counter() - self._t0)
            if wait > 0:
                await asyncio.sleep(wait)
                if self._stop.is_set():
                    break
            self.arrivals += 1
            due += rng.exponential(interval) if config.arrivals == "poisson" else interval
            if len(in_flight) >= config.max_in_flight:
                self.dropped += 1
                continue
            task = asyncio.create_task(self._send(self.sampler.next()))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.gather(*in_flight)

    # -- reporting

    async def _report_progress(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._write_progress()

    def _write_progress(self, final: bool = False) -> None:
        if not self.config.progress:
            return
        stream = self._progress_stream
        m = self.measurements
        elapsed = time.perf_counter() - self._t0
        done = len(m)
        status = np.asarray(m.status[:done], dtype=np.int64)
        answered = np.asarray(m.latency[:done], dtype=np.float64)[status > 0]
        if answered.size:
            p50, p99 = np.percentile(answered, (50, 99)) * 1000.0
            latency = f"p50 {p50:.1f} ms  p99 {p99:.1f} ms"
        else:
            latency = "p50 -  p99 -"
        errors = int(((status < 200) | (status >= 300)).sum())
        line = (
            f"{elapsed:6.1f}s  done {done}  {done / max(elapsed, 1e-9):.1f} req/s  "
            f"{latency}  errors {errors}"
        )
        if self.dropped:
            line += f"  dropped {self.dropped}"
        tty = getattr(stream, "isatty", lambda: False)()
        if tty:
            stream.write("\r" + line + "\x1b[K" + ("\n" if final else ""))
        else:
            stream.write(line + "\n")
        stream.flush()

    def _result(self, started_at: str, elapsed: float) -> dict:
        config, data = self.config, self.sampler.data
        stats = summarise(self.measurements, elapsed)
        return {
            "target": config.url,
            "mode": config.mode,
            "started_at": started_at,
            "config": asdict(config),
            "traffic": asdict(self.sampler.mix),
            "data": {"source": data.source, "users": data.n_users, "items": data.n_items},
            "seed": self.seed_outcome,
            "sent": len(self.measurements),
            "arrivals": self.arrivals,
            "dropped": self.dropped,
            **stats,
            "client": {"python": platform.python_version(), "host": platform.node()},
        }


def run_load(
    config: LoadConfig,
    sampler: TrafficSampler,
    progress_stream: TextIO | None = None,
    handle_sigint: bool = False,
    observer: Callable[[PlannedRequest, int, object], None] | None = None,
) -> dict:
    """Run one load test to its end (requests or duration) and return the result dict."""
    run = LoadRun(config, sampler, progress_stream, observer)
    return asyncio.run(run.run(handle_sigint))


# --------------------------------------------------------------------------- output


def format_summary(result: dict) -> str:
    """A few lines for the terminal."""
    config = result["config"]
    how = (
        f"closed loop, concurrency {config['concurrency']}"
        if result["mode"] == "closed"
        else f"open loop, {config['rate']:g} req/s ({config['arrivals']}), "
        f"max in flight {config['max_in_flight']}"
    )
    errors = dict(result["errors_by_status"], **result["errors_by_exception"])
    error_text = ", ".join(f"{k}: {v}" for k, v in errors.items()) or "none"
    lines = [
        f"target {result['target']}  {how}  elapsed {result['elapsed_s']:.1f} s",
        f"completed {result['completed']}  ok {result['ok']}  errors {result['errors']} "
        f"({error_text})  dropped {result['dropped']}",
        f"throughput {result['throughput_rps']:.1f} req/s  (ok {result['ok_rps']:.1f} req/s)",
        f"{'latency ms':<14}{'count':>8}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}",
    ]
    for name, row in result["latency_ms"].items():
        cells = [row[k] for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")]
        text = "".join(f"{c:>9.1f}" if c is not None else f"{'-':>9}" for c in cells)
        lines.append(f"  {name:<12}{row['count']:>8}{text}")
    cache = result["cache"]
    ratio = "-" if cache["hit_ratio"] is None else f"{cache['hit_ratio']:.3f}"
    lines.append(
        f"cache hit ratio {ratio} (hit {cache['hit']}, miss {cache['miss']}, "
        f"bypass {cache['bypass']})  fallback {result['fallback'] or 0}"
    )
    kinds = result["kinds"]
    mix = ", ".join(f"{k} {v}" for k, v in kinds.items())
    lines.append(f"requests: {mix} (repeats {result['repeats']})  seed {result['traffic']['seed']}")
    return "\n".join(lines)


def plot_timeline(result: dict, path: str | Path) -> Path:
    """PNG: per-second p50/p99 latency above, throughput and errors below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["timeline"]
    seconds = [r["second"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for key, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
        values = [np.nan if r[key] is None else r[key] for r in rows]
        top.plot(seconds, values, marker=".", label=label)
    top.set_ylabel("latency (ms)")
    top.legend(loc="best")
    top.grid(alpha=0.3)
    bottom.plot(seconds, [r["rps"] for r in rows], marker=".", label="completed/s")
    bottom.plot(seconds, [r["errors"] for r in rows], color="tab:red", label="errors/s")
    bottom.set_ylabel("requests / s")
    bottom.set_xlabel("second of the run")
    bottom.legend(loc="best")
    bottom.grid(alpha=0.3)
    config = result["config"]
    how = (
        f"concurrency {config['concurrency']}"
        if result["mode"] == "closed"
        else f"{config['rate']:g} req/s offered"
    )
    fig.suptitle(f"{result['target']}: {how}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    defaults, mix = LoadConfig(), TrafficMix()
    parser = argparse.ArgumentParser(
        prog="python bench/loadgen.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", default=DEFAULT_URL, help="the deployment (default %(default)s)")
    parser.add_argument("--data", default="synthetic", help="data spec for histories")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, default=defaults.concurrency, help="closed loop")
    mode.add_argument("--rate", type=float, help="open loop: arrivals per second")
    parser.add_argument("--max-in-flight", type=int, default=defaults.max_in_flight)
    parser.add_argument("--arrivals", choices=("poisson", "uniform"), default=defaults.arrivals)
    parser.add_argument("--requests", type=int, default=defaults.requests, help="at most")
    parser.add_argument(
        "--duration", type=float, default=defaults.duration_s, help="seconds, at most"
    )
    parser.add_argument("--timeout", type=float, default=defaults.timeout_s, help="per request")
    parser.add_argument("--events-share", type=float, default=mix.events_share)
    parser.add_argument("--user-id-share", type=float, default=mix.user_id_share)
    parser.add_argument("--repeat-share", type=float, default=mix.repeat_share)
    parser.add_argument("--max-history", type=int, default=mix.max_history)
    parser.add_argument("--events-batch", type=int, default=mix.events_batch)
    parser.add_argument("--seed-users", type=int, default=mix.seed_users)
    parser.add_argument("--k", type=int, default=mix.k)
    parser.add_argument("--encoder", default=None, help="default: the service's")
    parser.add_argument("--user-prefix", default=mix.user_prefix)
    parser.add_argument(
        "--seed", type=int, help="seed of the draws (default: a fresh one, saved in the result)"
    )
    parser.add_argument("--out", type=Path, help="write the JSON result here")
    parser.add_argument("--plot", type=Path, help="write a PNG of latency over time here")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    parser.add_argument("--no-check", action="store_true", help="skip the GET /healthz check")
    return parser


def quiet_http_logs() -> None:
    """Keep httpx and httpcore at WARNING: at INFO they log a line per request."""
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_http_logs()
    try:
        mix = TrafficMix(
            events_share=args.events_share,
            user_id_share=args.user_id_share,
            repeat_share=args.repeat_share,
            max_history=args.max_history,
            events_batch=args.events_batch,
            seed_users=args.seed_users,
            k=args.k,
            encoder=args.encoder,
            user_prefix=args.user_prefix,
            seed=args.seed if args.seed is not None else secrets.randbelow(2**31),
        )
        config = LoadConfig(
            url=args.url,
            requests=args.requests,
            duration_s=args.duration,
            concurrency=args.concurrency,
            rate=args.rate,
            max_in_flight=args.max_in_flight,
            arrivals=args.arrivals,
            timeout_s=args.timeout,
            progress=not args.quiet,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.no_check:
        problem = check_reachable(config.url, config.timeout_s)
        if problem:
            print(f"error: {problem} (--no-check skips this check)", file=sys.stderr)
            return 1
    try:
        sampler = TrafficSampler.from_spec(args.data, mix)
    except (DataError, ValueError) as exc:
        print(f"error: --data {args.data}: {exc}", file=sys.stderr)
        return 2
    result = run_load(config, sampler, handle_sigint=True)
    print(format_summary(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    if args.plot:
        print(f"wrote {plot_timeline(result, args.plot)}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Running a load test: requests sent in a closed or an open loop, and measured."""

from __future__ import annotations

import asyncio
import logging
import platform
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TextIO

import numpy as np

from bench.loadgen.report import summarise
from bench.loadgen.traffic import EVENTS, JSON_HEADERS, RECOMMEND, PlannedRequest, TrafficSampler

LOG = logging.getLogger("bench.loadgen")

DEFAULT_URL = "http://127.0.0.1:8000"


@dataclass(kw_only=True)
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
        *,
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


@dataclass(kw_only=True)
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
                request,
                started - self._t0,
                latency,
                status,
                error=error,
                cache=cache,
                fallback=fallback,
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


def quiet_http_logs() -> None:
    """Keep httpx and httpcore at WARNING: at INFO they log a line per request."""
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

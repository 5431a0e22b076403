"""The load generator measures what a stub server is known to do, and draws real traffic.

The stub is a small asyncio HTTP/1.1 server (keep-alive) on a free loopback port in a
thread of the test process: /recommend sleeps a known time and answers ``cache`` values
from a fixed cycle, /events fails with 503 on a fixed share of calls. It counts what it
served, so the load generator's counts are checked exactly, and its latencies only
loosely (shared machines are noisy).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import io
import json
import py_compile
import socket
import sys
import threading
import time
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bench.loadgen import (
    EVENTS,
    RECOMMEND,
    LoadConfig,
    Measurements,
    PlannedRequest,
    TrafficMix,
    TrafficSampler,
    latency_summary,
    run_load,
    summarise,
    timeline,
)
from bench.loadgen.__main__ import main
from training.data import build_sequences
from training.synthetic import SyntheticConfig, generate

SLEEP_S = 0.02
CACHE_CYCLE = ("hit", "miss", "miss", "bypass")  # served in this order to /recommend
EVENTS_FAIL_EVERY = 3  # every third /events call answers 503


class StubServer:
    """A tiny recserve look-alike that records what it served."""

    def __init__(self, sleep_s: float = SLEEP_S):
        self.sleep_s = sleep_s
        self.served = Counter()  # "cache:hit", "events:503", ...
        self.bodies: list[tuple[str, object]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._recommends = 0
        self._events = 0
        self._loop = asyncio.new_event_loop()
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        async def shutdown():
            self._server.close()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _route(self, path: str, body: bytes) -> tuple[int, dict]:
        if path == "/healthz":
            return 200, {"status": "ok"}
        payload = json.loads(body) if body else None
        self.bodies.append((path, payload))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.sleep_s)
        finally:
            self.in_flight -= 1
        if path == RECOMMEND:
            cache = CACHE_CYCLE[self._recommends % len(CACHE_CYCLE)]
            self._recommends += 1
            self.served[f"cache:{cache}"] += 1
            return 200, {"items": [], "cache": cache, "fallback": None}
        if path == EVENTS:
            self._events += 1
            if self._events % EVENTS_FAIL_EVERY == 0:
                self.served["events:503"] += 1
                return 503, {"detail": "behaviour store unavailable"}
            self.served["events:200"] += 1
            received = len(payload) if isinstance(payload, list) else 1
            return 200, {"received": received, "added": received}
        return 404, {"detail": "not found"}

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    break
                _method, path, _version = request_line.decode().split(" ", 2)
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode().partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                body = await reader.readexactly(length) if length else b""
                status, payload = await self._route(path, body)
                data = json.dumps(payload).encode()
                head = (
                    f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
                    f"content-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n"
                )
                writer.write(head.encode() + data)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
def stub():
    server = StubServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def interactions():
    return generate(SyntheticConfig(users=60, items=40, mean_length=12, seed=3))


@pytest.fixture(scope="module")
def sequences(interactions):
    return build_sequences(interactions)


def quiet(url: str, **overrides) -> LoadConfig:
    return LoadConfig(url=url, progress=False, timeout_s=5.0, **overrides)


# --------------------------------------------------------------------------- statistics


def test_latency_summary_reports_numpy_percentiles_in_milliseconds():
    latencies = np.arange(1, 101) / 1000.0  # 1..100 ms
    summary = latency_summary(latencies)
    assert summary["count"] == 100
    assert summary["p50_ms"] == pytest.approx(50.5)
    assert summary["p95_ms"] == pytest.approx(95.05)
    assert summary["p99_ms"] == pytest.approx(99.01)
    assert summary["max_ms"] == pytest.approx(100.0)
    assert summary["mean_ms"] == pytest.approx(50.5)
    assert latency_summary([]) == {
        "count": 0, "mean_ms": None, "p50_ms": None, "p95_ms": None, "p99_ms": None,
        "max_ms": None,
    }  # fmt: skip


def test_summary_splits_endpoints_counts_errors_and_reads_the_cache_field():
    m = Measurements()
    recommend = PlannedRequest(RECOMMEND, "history", b"{}")
    events = PlannedRequest(EVENTS, "events", b"{}")
    for i, (cache, latency) in enumerate([("hit", 0.010), ("miss", 0.020), ("hit", 0.030)]):
        m.add(recommend, started=i * 0.5, latency=latency, status=200, cache=cache)
    m.add(recommend, started=1.5, latency=0.500, status=500)
    m.add(events, started=0.1, latency=0.004, status=200)
    m.add(events, started=0.2, latency=0.002, status=503)
    m.add(events, started=2.2, latency=5.0, status=0, error="ReadTimeout")
    result = summarise(m, elapsed_s=2.5)
    assert result["completed"] == 7 and result["ok"] == 4 and result["errors"] == 3
    assert result["throughput_rps"] == pytest.approx(7 / 2.5)
    assert result["errors_by_status"] == {"500": 1, "503": 1}
    assert result["errors_by_exception"] == {"ReadTimeout": 1}
    assert result["cache"] == {"hit": 2, "miss": 1, "bypass": 0, "other": 0, "hit_ratio": 2 / 3}
    latency = result["latency_ms"]
    assert latency["/recommend"]["count"] == 4  # the 500 answered; it counts
    assert latency["/recommend"]["max_ms"] == pytest.approx(500.0)
    assert latency["/events"]["count"] == 2  # the timeout has no latency
    assert latency["/events"]["p50_ms"] == pytest.approx(3.0)
    assert latency["overall"]["count"] == 6
    assert result["kinds"] == {"history": 4, "user_id": 0, "events": 3}


def test_timeline_bins_by_completion_second_and_scales_the_partial_last_second():
    finished = [0.1, 0.2, 0.9, 1.5, 2.1]
    latencies = [0.010, 0.020, np.nan, 0.040, 0.050]
    failed = [False, False, True, False, False]
    rows = timeline(finished, latencies, failed, elapsed_s=2.5)
    assert [r["completed"] for r in rows] == [3, 1, 1]
    assert [r["errors"] for r in rows] == [1, 0, 0]
    assert rows[0]["p50_ms"] == pytest.approx(15.0)  # the NaN (no response) is left out
    assert rows[2]["rps"] == pytest.approx(2.0)  # one completion in half a second
    assert rows[1]["p99_ms"] == pytest.approx(40.0)


# --------------------------------------------------------------------------- traffic


def test_repeat_share_of_history_requests_is_as_configured(sequences):
    mix = TrafficMix(repeat_share=0.3, events_share=0.0, user_id_share=0.0, seed=7)
    sampler = TrafficSampler(sequences, mix)
    draws = [sampler.next() for _ in range(1000)]
    assert all(r.endpoint == RECOMMEND and r.kind == "history" for r in draws)
    share = sum(r.repeat for r in draws) / len(draws)
    assert share == pytest.approx(0.3, abs=0.045)
    first_bodies = {r.body for r in draws if not r.repeat}
    assert all(r.body in first_bodies for r in draws if r.repeat)  # exactly an earlier body


def test_mix_of_events_and_user_id_requests_follows_the_shares(sequences):
    mix = TrafficMix(events_share=0.2, user_id_share=0.5, repeat_share=0.0, seed=1)
    sampler = TrafficSampler(sequences, mix)
    seeds = sampler.seed_requests()
    for request in seeds:
        sampler.mark_stored(request)
    draws = Counter(sampler.next().kind for _ in range(1000))
    assert draws["events"] / 1000 == pytest.approx(0.2, abs=0.04)
    assert draws["user_id"] / (1000 - draws["events"]) == pytest.approx(0.5, abs=0.05)


def test_histories_are_chronological_windows_of_a_users_real_events(interactions, sequences):
    per_user: dict[str, list[tuple[str, int]]] = {}
    order = np.lexsort((np.arange(len(interactions)), interactions.timestamps))
    for i in order.tolist():
        user = str(interactions.users[i])
        per_user.setdefault(user, []).append(
            (str(interactions.items[i]), int(interactions.timestamps[i]))
        )
    mix = TrafficMix(repeat_share=0.0, events_share=0.0, user_id_share=0.0, max_history=8)
    sampler = TrafficSampler(sequences, mix)
    for _ in range(200):
        body = sampler.next().json()
        user = body["user_id"].removeprefix(mix.user_prefix)
        history = [(e["item_id"], e["ts"]) for e in body["history"]]
        assert 1 <= len(history) <= 8
        assert [ts for _, ts in history] == sorted(ts for _, ts in history)
        real = per_user[user]
        starts = [i for i in range(len(real)) if real[i : i + len(history)] == history]
        assert starts, f"history of {user} is not a window of its events"


def test_events_continue_a_users_history_after_the_seeded_part(sequences):
    mix = TrafficMix(events_share=1.0, seed_users=5, seed=2)
    sampler = TrafficSampler(sequences, mix)
    seeds = sampler.seed_requests()
    seeded = {request.user for request in seeds}
    assert len(seeded) == 5
    stored: dict[int, list] = {}
    for request in seeds:
        stored.setdefault(request.user, []).extend(request.json())
    for _ in range(300):
        request = sampler.next()
        event = request.json()
        assert set(event) == {"user_id", "item_id", "ts"}
        stored.setdefault(request.user, []).append(event)
    for user, sent in stored.items():
        start, end = sequences.offsets[user], sequences.offsets[user + 1]
        real = sampler.events(user, start, end)
        replay = [{"item_id": e["item_id"], "ts": e["ts"]} for e in sent]
        assert replay[: len(real)] == real[: len(replay)]  # in order, nothing skipped


# --------------------------------------------------------------------------- against a stub


def test_closed_loop_measures_the_stub_exactly_where_it_can(stub, sequences):
    mix = TrafficMix(events_share=0.3, user_id_share=0.2, repeat_share=0.3, seed_users=4)
    config = quiet(stub.url, requests=80, duration_s=30, concurrency=4)
    result = run_load(config, TrafficSampler(sequences, mix))

    assert result["sent"] == result["completed"] == 80  # the request bound
    assert result["seed"]["requests"] > 0  # seeding happened first, not measured
    measured = Counter()
    for path, _ in stub.bodies[-80:]:
        measured[path] += 1
    assert result["latency_ms"]["/recommend"]["count"] == measured[RECOMMEND]
    # errors by status exactly as served, after the seed calls the stub also answered
    seed_503 = int(result["seed"]["statuses"].get("503", 0))
    expected_503 = stub.served["events:503"] - seed_503
    assert expected_503 > 0
    assert result["errors_by_status"] == {"503": expected_503}
    assert result["errors_by_exception"] == {}
    cache = result["cache"]
    for value in ("hit", "miss", "bypass"):
        assert cache[value] == stub.served[f"cache:{value}"]
    assert cache["hit_ratio"] == stub.served["cache:hit"] / measured[RECOMMEND]
    assert result["kinds"]["user_id"] > 0 and result["kinds"]["events"] > 0

    for name in ("overall", "/recommend", "/events"):
        row = result["latency_ms"][name]
        assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"] <= row["max_ms"]
        assert row["p50_ms"] >= SLEEP_S * 1000
        assert row["p50_ms"] < SLEEP_S * 1000 + 1000  # loose: noisy shared machine
    # four workers waiting SLEEP_S each cannot go faster than 4 / SLEEP_S requests a second
    assert result["throughput_rps"] == pytest.approx(80 / result["elapsed_s"])
    assert result["throughput_rps"] <= 4 / SLEEP_S * 1.05
    assert result["elapsed_s"] >= 80 / 4 * SLEEP_S * 0.95
    assert sum(r["completed"] for r in result["timeline"]) == 80
    assert stub.max_in_flight <= 4  # the pool is sized to the concurrency


def test_duration_bound_stops_the_run(stub, sequences):
    mix = TrafficMix(events_share=0.0, user_id_share=0.0)
    config = quiet(stub.url, requests=1_000_000, duration_s=0.6, concurrency=2)
    started = time.perf_counter()
    result = run_load(config, TrafficSampler(sequences, mix))
    assert time.perf_counter() - started < 0.6 + 2.0
    assert 0 < result["completed"] <= 0.6 / SLEEP_S * 2 + 2
    assert result["elapsed_s"] >= 0.6


def test_open_loop_sends_at_the_rate_and_drops_beyond_the_in_flight_bound(stub, sequences):
    mix = TrafficMix(events_share=0.0, user_id_share=0.0)
    config = quiet(stub.url, requests=20, duration_s=30, rate=50, arrivals="uniform")
    result = run_load(config, TrafficSampler(sequences, mix))
    assert result["mode"] == "open" and result["sent"] == 20 and result["dropped"] == 0
    assert result["elapsed_s"] >= 19 / 50  # the last arrival is due at 19/50 s

    slow = StubServer(sleep_s=0.2)
    try:
        config = quiet(slow.url, requests=30, duration_s=30, rate=1000, max_in_flight=2)
        result = run_load(config, TrafficSampler(sequences, mix))
    finally:
        slow.close()
    assert result["arrivals"] == 30
    assert result["sent"] + result["dropped"] == 30 and result["dropped"] > 0
    assert slow.max_in_flight <= 2


def test_connection_errors_are_counted_by_exception_type(sequences):
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mix = TrafficMix(events_share=0.0, user_id_share=0.0)
    result = run_load(
        quiet(f"http://127.0.0.1:{port}", requests=5, concurrency=1), TrafficSampler(sequences, mix)
    )
    assert result["errors_by_exception"] == {"ConnectError": 5}
    assert result["ok"] == 0 and result["latency_ms"]["overall"]["count"] == 0
    assert result["cache"]["hit_ratio"] is None


def test_cli_writes_json_and_png_and_a_progress_line(stub, tmp_path, capsys):
    out, plot = tmp_path / "result.json", tmp_path / "latency.png"
    argv = [
        "--url", stub.url, "--data", "synthetic:users=30,items=20,mean_length=8",
        "--requests", "30", "--duration", "20", "--concurrency", "3",
        "--events-share", "0.2", "--user-id-share", "0.2", "--seed-users", "3",
        "--out", str(out), "--plot", str(plot),
    ]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "done 30" in captured.err and "req/s" in captured.err  # the final progress line
    assert "throughput" in captured.out and "cache hit ratio" in captured.out
    result = json.loads(out.read_text())
    for key in (
        "target", "mode", "config", "traffic", "data", "elapsed_s", "completed", "ok", "errors",
        "throughput_rps", "latency_ms", "errors_by_status", "errors_by_exception", "cache",
        "timeline", "dropped",
    ):  # fmt: skip
        assert key in result, key
    assert set(result["latency_ms"]) == {"overall", "/recommend", "/events"}
    assert result["completed"] == 30
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_refuses_a_target_that_is_not_an_http_url(capsys):
    assert main(["--url", "ftp://127.0.0.1/", "--requests", "1"]) == 2
    assert "http" in capsys.readouterr().err


def test_cli_stops_before_loading_data_when_the_target_does_not_answer(capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert main(["--url", f"http://127.0.0.1:{port}", "--requests", "1"]) == 1
    assert "does not answer" in capsys.readouterr().err


def test_progress_line_goes_to_the_given_stream(stub, sequences):
    stream = io.StringIO()
    config = LoadConfig(url=stub.url, requests=10, concurrency=2, progress=True)
    run_load(
        config, TrafficSampler(sequences, TrafficMix(user_id_share=0.0, events_share=0.0)), stream
    )
    line = stream.getvalue().strip().splitlines()[-1]
    assert "done 10" in line and "p50" in line and "errors 0" in line


# --------------------------------------------------------------------------- locust


def test_locustfile_compiles_and_sends_the_same_traffic_with_a_stand_in_locust(sequences):
    path = Path(__file__).resolve().parents[2] / "bench" / "locustfile.py"
    py_compile.compile(str(path), doraise=True)

    class FakeResponse:
        def __init__(self, status, payload):
            self.status_code, self._payload, self.outcome = status, payload, None

        def json(self):
            return self._payload

        def success(self):
            self.outcome = "success"

        def failure(self, why):
            self.outcome = why

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class FakeClient:
        def __init__(self):
            self.sent = []

        def post(self, path, data, headers, name, catch_response):
            self.sent.append((path, name, json.loads(data)))
            if path == RECOMMEND:
                return FakeResponse(200, {"cache": "hit"})
            return FakeResponse(200, {"received": 1, "added": 1})

    class FakeHttpUser:
        def __init__(self):
            self.client = FakeClient()

    class Hooks:
        def add_listener(self, function):
            return function

    fake = types.ModuleType("locust")
    fake.HttpUser = FakeHttpUser
    fake.constant = lambda seconds: seconds
    fake.task = lambda function: function
    fake.events = types.SimpleNamespace(
        **{
            name: Hooks()
            for name in (
                "init_command_line_parser",
                "init",
                "report_to_master",
                "worker_report",
                "quitting",
            )
        }  # fmt: skip
    )
    saved = sys.modules.get("locust")
    sys.modules["locust"] = fake
    try:
        sys.modules.pop("bench.locustfile", None)
        locustfile = importlib.import_module("bench.locustfile")
        mix = TrafficMix(events_share=0.2, user_id_share=0.3, repeat_share=0.3, seed_users=3)
        locustfile._state.update(sampler=TrafficSampler(sequences, mix), seeded=False)
        user = locustfile.RecserveUser()
        user.on_start()
        for _ in range(100):
            user.send_next()
    finally:
        sys.modules.pop("bench.locustfile", None)
        if saved is None:
            sys.modules.pop("locust", None)
        else:
            sys.modules["locust"] = saved
    names = Counter(name for _, name, _ in user.client.sent)
    assert names["/events [seed]"] >= 3
    assert names["/recommend [history repeat]"] > 0 and names["/recommend [user_id]"] > 0
    assert names["/events [events]"] > 0
    assert locustfile.CACHE_TALLY["hit"] == sum(v for k, v in names.items() if "recommend" in k)
    locustfile.CACHE_TALLY.clear()


def test_locustfile_imports_without_locust():
    if importlib.util.find_spec("locust") is not None:
        pytest.skip("locust is installed")
    sys.modules.pop("bench.locustfile", None)
    locustfile = importlib.import_module("bench.locustfile")
    assert locustfile.HttpUser is None and not hasattr(locustfile, "RecserveUser")

"""Fault runs against the real service: what it does when things break under load.

    .venv/bin/python -m bench.faults --scenario all --out docs/reliability.json --markdown
    .venv/bin/python -m bench.faults --scenario soak --soak-seconds 600

(from the repository root). Each scenario starts a private redis-server on a free port
(persistent, so a stop and start keeps what Redis acknowledged, as AOF does in
production) and the service under uvicorn exactly as deployed, and drives it over HTTP:

- ``redis-outage``: the load generator's mix (/recommend with histories, repeats and
  user_id-only requests, /events) while Redis is stopped and started again. Passes when
  no /recommend got a 5xx, every refused /events was a 503 with Retry-After, every
  acknowledged event is in Redis afterwards, and the cache hit ratio of repeated
  requests after the outage reaches 80% of what it was before.
- ``reload``: ``POST /admin/reload`` ``--reloads`` times during load, alternating two
  bundles, with ``--workers`` 2. Passes when no request failed, every response names one
  of the two bundles, every response naming a bundle returned that bundle's ranking for
  its history (the same history always gets the same items from the same bundle), all
  workers end on the last bundle, and resident memory ends within (baseline + one bundle)
  + 10%.
- ``bad-bundle``: CURRENT names a bundle with a bad checksum, a missing file, a truncated
  index, a wrong format version. Passes when each reload is refused naming the file,
  /readyz says why, and the old bundle answers every request meanwhile.
- ``soak``: an open-loop moderate rate for ``--soak-seconds``. Passes with no errors and
  resident memory after the run within 10% of what it was after warm-up.

Without ``--models-dir`` two small bundles (same catalogue, different seeds) are trained
and exported from the built-in synthetic data first. Rows go to ``--out`` as JSON; with
``--markdown`` the table for docs/RELIABILITY.md is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.loadgen import quiet_http_logs  # noqa: E402
from bench.processes import ServiceProcess  # noqa: E402
from tests.servers import RedisProcess, free_port, wait_until  # noqa: E402

LOG = logging.getLogger("bench.faults")

SCENARIOS = ("redis-outage", "reload", "bad-bundle", "compute", "soak")
COMMAND = ".venv/bin/python -m bench.faults --scenario {scenario}"
JSON = {"Content-Type": "application/json"}


@dataclass(kw_only=True)
class FaultRow:
    """One line of the reliability table."""

    fault: str
    behaviour: str  # what the service did
    requests: int
    errors: int  # failed requests (5xx, transport errors, or a status the fault forbids)
    events_lost: int
    passed: bool
    command: str
    details: dict = field(default_factory=dict)


@dataclass
class Fixture:
    """What every scenario serves: a models dir with two bundles and the data behind them."""

    models_dir: Path
    bundles: tuple[str, str]
    data: object  # training.data.SequenceData
    workdir: Path


def build_fixture(workdir: Path, data, epochs: int = 2, max_len: int = 32) -> Fixture:
    """Train two small SASRec-kind models (seeds 0 and 1) on ``data`` (SequenceData) and
    export one bundle each; the first is CURRENT."""
    from training.export import export_bundle
    from training.trainer import TrainConfig, train

    models_dir = workdir / "models"
    names = []
    for seed, name in enumerate(("faults-a", "faults-b")):
        config = TrainConfig(
            epochs=epochs, seed=seed, lr=3e-3, model_options={"max_len": max_len, "dim": 32}
        )
        run = train(data, config, workdir / f"run-{name}")
        export_bundle([run.checkpoint], data, models_dir, name=name, make_current=seed == 0)
        names.append(name)
    return Fixture(models_dir, (names[0], names[1]), data, workdir)


def service_settings(fixture: Fixture, redis: RedisProcess, token: str, **extra) -> dict:
    """RECSERVE_* variables of a fault run; histories are never trimmed, so that every
    acknowledged event can be looked up afterwards."""
    settings = {
        "RECSERVE_MODELS_DIR": str(fixture.models_dir),
        "RECSERVE_REDIS_URL": redis.url,
        "RECSERVE_KEY_PREFIX": "faults",
        "RECSERVE_ADMIN_TOKEN": token,
        "RECSERVE_DEVICE": "cpu",
        "RECSERVE_HISTORY_CAP": "100000",
        "RECSERVE_RELOAD_POLL_SECONDS": "0",
    }
    settings.update({f"RECSERVE_{k.upper()}": str(v) for k, v in extra.items()})
    return settings


@contextmanager
def private_stack(
    fixture: Fixture, name: str, *, persistent: bool = False, workers: int = 1, **settings
) -> Iterator[tuple[RedisProcess, ServiceProcess, str]]:
    """A redis-server of the scenario's own and the service on it, with a fresh admin
    token, running until the block ends; both write into a new folder ``name-*`` of the
    workdir."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=fixture.workdir))
    redis = RedisProcess(free_port(), workdir / "redis", persistent=persistent)
    redis.start()
    try:
        token = secrets.token_hex(16)
        service = ServiceProcess(
            service_settings(fixture, redis, token, **settings),
            workers=workers,
            log_path=workdir / "uvicorn.log",
        )
        try:
            service.start()
            yield redis, service, token
        finally:
            service.stop()
    finally:
        redis.stop()


class Recorder:
    """Every measured request of a load run, as the load generator's observer."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.rows: list[dict] = []
        self.acknowledged: list[tuple[str, str, int]] = []  # (user, item, ts) stored
        self.first_sent: dict[bytes, float] = {}  # /recommend body -> when it was first sent

    def __call__(self, request, status: int, response) -> None:
        row = {"t": time.monotonic() - self.t0, "kind": request.kind, "status": status}
        if response is not None:
            row["retry_after"] = response.headers.get("retry-after")
            if request.endpoint == "/recommend" and status == 200:
                row["cache"] = response.json().get("cache")
        if request.endpoint == "/events" and 200 <= status < 300:
            body = request.json()
            for event in body if isinstance(body, list) else [body]:
                self.acknowledged.append((event["user_id"], event["item_id"], event["ts"]))
        row["repeat"] = request.repeat
        if request.endpoint == "/recommend":
            row["first_sent"] = self.first_sent.setdefault(request.body, row["t"])
        self.rows.append(row)


def _load_in_thread(url: str, data, mix_options: dict, load_options: dict, observer):
    """Start the load generator in a thread; returns (thread, result holder)."""
    from bench.loadgen import LoadConfig, TrafficMix, TrafficSampler, run_load

    config = LoadConfig(url=url, progress=False, requests=10**9, **load_options)
    sampler = TrafficSampler(data, TrafficMix(**mix_options))
    holder: dict = {}

    def target() -> None:
        try:
            holder["result"] = run_load(config, sampler, observer=observer)
        except BaseException as exc:  # reported by the caller, not lost in the thread
            holder["error"] = exc

    thread = threading.Thread(target=target, name="load", daemon=True)
    thread.start()
    return thread, holder


def _recorded_load(service, fixture: Fixture, mix: dict, *, duration: float, concurrency: int):
    """A closed-loop load run of ``duration`` seconds on ``service``, every request recorded;
    returns (recorder, thread, result holder)."""
    recorder = Recorder()
    thread, holder = _load_in_thread(
        service.url,
        fixture.data,
        mix,
        {"duration_s": duration, "concurrency": concurrency},
        recorder,
    )
    return recorder, thread, holder


def _finish(thread: threading.Thread, holder: dict, timeout: float) -> dict:
    thread.join(timeout)
    if thread.is_alive():
        raise RuntimeError("the load generator did not stop")
    if "error" in holder:
        raise holder["error"]
    return holder["result"]


def missing_events(redis_url: str, prefix: str, events: list[tuple[str, str, int]]) -> int:
    """How many acknowledged (user, item, ts) events are not in the users' Redis histories."""
    from service.cache import RedisBehaviourCache

    async def count() -> int:
        # The cap only trims at a write; reading back needs none of it.
        cache = RedisBehaviourCache(
            redis_url, prefix, history_cap=100_000, ttl_seconds=1, timeout=5.0
        )
        try:
            stored = {user: set(await cache.history(user)) for user in {u for u, _, _ in events}}
        finally:
            await cache.close()
        return sum((item, ts) not in stored[user] for user, item, ts in events)

    return asyncio.run(count())


def _hit_ratio(rows: list[dict]) -> float | None:
    served = [r for r in rows if r.get("repeat") and r.get("cache") in ("hit", "miss")]
    return sum(r["cache"] == "hit" for r in served) / len(served) if served else None


def _cacheable(row: dict, down_at: float, back_at: float) -> bool:
    """A repeat whose first send found Redis up, so that its entry could be cached."""
    return row.get("first_sent", 0.0) < down_at or row.get("first_sent", 0.0) >= back_at


# --------------------------------------------------------------------------- scenarios


def redis_outage(
    fixture: Fixture,
    *,
    duration: float = 30.0,
    outage_at: float = 10.0,
    outage_for: float = 8.0,
    concurrency: int = 4,
) -> FaultRow:
    """Stop Redis during a load run and start it again."""
    with private_stack(fixture, "outage", persistent=True) as (redis, service, _):
        mix = {"events_share": 0.25, "user_id_share": 0.2, "repeat_share": 0.5, "seed_users": 50}
        recorder, thread, holder = _recorded_load(
            service, fixture, mix, duration=duration, concurrency=concurrency
        )
        time.sleep(outage_at)
        down_at = time.monotonic() - recorder.t0
        redis.stop(graceful=True)
        time.sleep(outage_for)
        redis.start()
        up_at = time.monotonic() - recorder.t0
        result = _finish(thread, holder, duration + 60)
        lost = missing_events(redis.url, "faults", recorder.acknowledged)
    rows = recorder.rows
    recommend = [r for r in rows if r["kind"] in ("history", "user_id")]
    events = [r for r in rows if r["kind"] == "events"]
    recommend_5xx = sum(r["status"] >= 500 or r["status"] == 0 for r in recommend)
    history_5xx = sum(
        r["status"] >= 500 or r["status"] == 0 for r in recommend if r["kind"] == "history"
    )
    refused = [r for r in events if not 200 <= r["status"] < 300]
    bad_refusals = sum(r["status"] != 503 or not r.get("retry_after") for r in refused)
    during = [r for r in rows if down_at <= r["t"] < up_at]
    # Repeats of bodies first sent during the outage were never cached and miss once
    # more; the recovery is judged on the repeats that could have been cached (first sent
    # before the outage, kept by Redis across the restart, or after it came back).
    back_at = up_at + 2.0
    before = _hit_ratio([r for r in rows if r["t"] < down_at])
    after_rows = [r for r in rows if r["t"] >= back_at]
    after = _hit_ratio([r for r in after_rows if _cacheable(r, down_at, back_at)])
    after_all = _hit_ratio(after_rows)
    recovered = before is not None and after is not None and after >= 0.8 * before
    passed = recommend_5xx == 0 and bad_refusals == 0 and lost == 0 and recovered
    fallbacks = sum(r.get("cache") == "bypass" for r in during)
    return FaultRow(
        fault=f"Redis stopped for {outage_for:.0f} s during a {duration:.0f} s load run",
        behaviour=(
            f"/recommend kept answering (5xx: {recommend_5xx}; {fallbacks} answers bypassed "
            f"the cache while Redis was down); {len(refused)} /events got 503 with "
            f"Retry-After, {len(events) - len(refused)} were stored; cache hit ratio of "
            f"repeats {_pct(before)} before, {_pct(after)} after ({_pct(after_all)} "
            f"counting repeats of bodies first sent while Redis was down)"
        ),
        requests=len(rows),
        errors=recommend_5xx + bad_refusals,
        events_lost=lost,
        passed=passed,
        command=COMMAND.format(scenario="redis-outage"),
        details={
            "recommend_5xx": recommend_5xx,
            "history_requests_5xx": history_5xx,
            "events_acknowledged": len(recorder.acknowledged),
            "events_refused": len(refused),
            "events_refused_without_503_retry_after": bad_refusals,
            "requests_while_down": len(during),
            "hit_ratio_before": before,
            "hit_ratio_after": after,
            "hit_ratio_after_all_repeats": after_all,
            "down_at_s": down_at,
            "up_at_s": up_at,
            "load": _load_summary(result),
        },
    )


def reload_under_load(
    fixture: Fixture,
    *,
    reloads: int = 10,
    interval: float = 1.5,
    workers: int = 2,
    concurrency: int = 8,
    histories: int = 40,
) -> FaultRow:
    """Alternate the two bundles with POST /admin/reload while requests keep coming."""
    import httpx

    from service.bundle import read_manifest, set_current

    first, second = fixture.bundles
    set_current(fixture.models_dir, first)
    bodies = _history_bodies(fixture.data, histories)
    manifest = read_manifest(fixture.models_dir / first)
    bundle_bytes = sum(f["bytes"] for f in manifest["files"].values())
    seen: list[tuple[int, int, str | None, tuple]] = []  # (body, status, bundle, items)
    stop = threading.Event()
    rss: list[tuple[float, int]] = []
    admin: list[dict] = []
    t0 = time.monotonic()
    stack = private_stack(fixture, "reload", workers=workers, reload_poll_seconds=1)
    with stack as (_, service, token):
        try:
            loader = threading.Thread(
                target=lambda: asyncio.run(
                    _fixed_load(service.url, bodies, concurrency, stop, seen)
                ),
                daemon=True,
            )
            sampler = threading.Thread(
                target=_sample_rss,
                args=(service, stop, rss, t0),
                kwargs={"every": 0.2},
                daemon=True,
            )
            loader.start()
            sampler.start()
            time.sleep(3.0)  # warm-up: every worker has served both caches' misses
            baseline = service.rss_bytes()
            with httpx.Client(base_url=service.url, timeout=30) as client:
                for number in range(reloads):
                    target = (second, first)[number % 2]
                    set_current(fixture.models_dir, target)
                    answer = client.post(
                        "/admin/reload", headers={"Authorization": f"Bearer {token}"}
                    )
                    admin.append({"to": target, "status": answer.status_code, **answer.json()})
                    time.sleep(interval)
                final = (second, first)[(reloads - 1) % 2]
                converged_at = len(seen)
                wait_until(
                    lambda: _tail_serves(seen, converged_at, final, 4 * concurrency),
                    timeout=30,
                    what=f"every worker to serve {final}",
                )
            time.sleep(1.0)
            settled = service.rss_bytes()
        finally:
            stop.set()
    failed = sum(status != 200 for _, status, _, _ in seen)
    names = {bundle for _, status, bundle, _ in seen if status == 200}
    rankings: dict[tuple[int, str], set] = {}
    for body, status, bundle, items in seen:
        if status == 200:
            rankings.setdefault((body, bundle), set()).add(items)
    inconsistent = sum(len(v) > 1 for v in rankings.values())
    differing = sum(
        rankings.get((b, first)) != rankings.get((b, second))
        for b in range(len(bodies))
        if (b, first) in rankings and (b, second) in rankings
    )
    admin_failed = sum(a["status"] != 200 for a in admin)
    limit = (baseline + bundle_bytes) * 1.10
    peak = max((value for _, value in rss), default=settled)
    passed = (
        failed == 0
        and admin_failed == 0
        and names <= {first, second}
        and inconsistent == 0
        and settled <= limit
    )
    return FaultRow(
        fault=f"POST /admin/reload x{reloads} under load, alternating two bundles, "
        f"{workers} workers",
        behaviour=(
            f"every request answered 200 by one of the two bundles; the same history got "
            f"the same items from the same bundle every time ({differing} of "
            f"{len(bodies)} histories ranked differently by the two bundles); memory "
            f"{_mib(baseline)} before, {_mib(settled)} after, peak {_mib(peak)} "
            f"(limit {_mib(limit)})"
        ),
        requests=len(seen),
        errors=failed + admin_failed,
        events_lost=0,
        passed=passed,
        command=COMMAND.format(scenario="reload"),
        details={
            "failed": failed,
            "admin": admin,
            "bundles_named": sorted(n for n in names if n),
            "inconsistent_rankings": inconsistent,
            "histories_ranked_differently": differing,
            "rss_baseline_bytes": baseline,
            "rss_settled_bytes": settled,
            "rss_peak_bytes": peak,
            "rss_limit_bytes": limit,
            "bundle_bytes": bundle_bytes,
            "workers": workers,
        },
    )


BAD_BUNDLES = {
    "bad checksum": ("retrievers/sasrec/items.faiss", "checksum"),
    "missing file": ("retrievers/sasrec/user_encoder.onnx", "missing"),
    "truncated index": ("retrievers/sasrec/items.faiss", "size"),
    "wrong format version": ("manifest.json", "format version"),
    # Checksums consistent, parts that do not fit: what the outside probe reloaded.
    "vector table wider than its encoder output": (
        "retrievers/sasrec/item_embeddings.npy",
        "width",
    ),
    "manifest path outside its folder": ("manifest.json", "outside the bundle"),
}


def spoil(bundle: Path, case: str) -> str:
    """Break a copy of a bundle as ``case`` says; returns the file the refusal must name."""
    relative, _ = BAD_BUNDLES[case]
    target = bundle / relative
    if case == "bad checksum":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif case == "missing file":
        target.unlink()
    elif case == "truncated index":
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif case == "wrong format version":
        manifest = json.loads(target.read_text())
        manifest["format_version"] = 999
        target.write_text(json.dumps(manifest))
    elif case == "vector table wider than its encoder output":
        vectors = np.load(target)
        np.save(target, np.hstack([vectors, vectors[:, :1]]), allow_pickle=False)
        _rewrite_manifest(bundle, relative, dim=vectors.shape[1] + 1)
    elif case == "manifest path outside its folder":
        manifest = json.loads(target.read_text())
        files = manifest["retrievers"]["sasrec"]["files"]
        files["user_encoder"] = f"../{bundle.name}-elsewhere/user_encoder.onnx"
        target.write_text(json.dumps(manifest))
    else:
        raise ValueError(f"unknown case {case!r}")
    return Path(relative).name


def _rewrite_manifest(bundle: Path, changed: str, **retriever_fields) -> None:
    """Record ``changed``'s new size and checksum (and set ``retriever_fields`` on sasrec)
    so that the bundle stays checksum-consistent."""
    from service.bundle import sha256_of

    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"][changed] = {
        "sha256": sha256_of(bundle / changed),
        "bytes": (bundle / changed).stat().st_size,
    }
    manifest["retrievers"]["sasrec"].update(retriever_fields)
    path.write_text(json.dumps(manifest))


def bad_bundles(fixture: Fixture, cases: tuple[str, ...] = tuple(BAD_BUNDLES)) -> list[FaultRow]:
    """Name each kind of broken bundle in CURRENT and ask for a reload, under light load."""
    import httpx

    from service.bundle import set_current

    good = fixture.bundles[0]
    set_current(fixture.models_dir, good)
    body = _history_bodies(fixture.data, 1)[0]
    rows = []
    with (
        private_stack(fixture, "bad") as (_, service, token),
        httpx.Client(base_url=service.url, timeout=30) as client,
    ):
        for case in cases:
            name = f"bad-{case.replace(' ', '-')}"
            shutil.rmtree(fixture.models_dir / name, ignore_errors=True)
            shutil.copytree(fixture.models_dir / good, fixture.models_dir / name)
            named = spoil(fixture.models_dir / name, case)
            set_current(fixture.models_dir, name)
            reload = client.post("/admin/reload", headers={"Authorization": f"Bearer {token}"})
            ready = client.get("/readyz", headers={"Authorization": f"Bearer {token}"}).json()
            answers = [client.post("/recommend", content=body, headers=JSON) for _ in range(20)]
            wrong = sum(a.status_code != 200 or a.json().get("bundle") != good for a in answers)
            detail = reload.json().get("detail", "")
            why = BAD_BUNDLES[case][1]
            passed = (
                reload.status_code == 409
                and named in detail
                and why in detail
                and named in (ready.get("last_error") or "")
                and ready.get("bundle") == good
                and wrong == 0
            )
            rows.append(
                FaultRow(
                    fault=f"CURRENT names a bundle with a {case}",
                    behaviour=(
                        f"reload refused with {reload.status_code} naming {named} "
                        f"({why}); /readyz reports it; {good} kept serving"
                    ),
                    requests=len(answers) + 2,
                    errors=wrong + (reload.status_code != 409),
                    events_lost=0,
                    passed=passed,
                    command=COMMAND.format(scenario="bad-bundle"),
                    details={"detail": detail, "readyz": ready},
                )
            )
            set_current(fixture.models_dir, good)
            shutil.rmtree(fixture.models_dir / name)
    return rows


def soak(
    fixture: Fixture, *, seconds: float = 600.0, rate: float = 50.0, warmup: float = 60.0
) -> FaultRow:
    """A moderate open-loop rate for ``seconds``; memory after warm-up against the end."""
    rss: list[tuple[float, int]] = []
    rss_by_role: list[tuple[float, dict[str, int]]] = []
    stop = threading.Event()
    with private_stack(fixture, "soak") as (_, service, _):
        try:
            recorder = Recorder()
            t0 = time.monotonic()
            sampler = threading.Thread(
                target=_sample_rss,
                args=(service, stop, rss, t0),
                kwargs={"every": 2.0, "by_role": rss_by_role},
                daemon=True,
            )
            sampler.start()
            mix = {"events_share": 0.1, "user_id_share": 0.2, "repeat_share": 0.3, "seed_users": 50}
            thread, holder = _load_in_thread(
                service.url, fixture.data, mix, {"duration_s": seconds, "rate": rate}, recorder
            )
            result = _finish(thread, holder, seconds + 120)
        finally:
            stop.set()
    after_warmup = [v for t, v in rss if warmup <= t < warmup + 30] or [rss[0][1]]
    end = [v for t, v in rss[-10:]]
    start_rss, end_rss = statistics.median(after_warmup), statistics.median(end)
    growth = end_rss / start_rss - 1.0
    latency = result["latency_ms"]["overall"]
    errors = result["errors"]  # non-2xx answers and transport errors
    return FaultRow(
        fault=f"soak: {rate:.0f} req/s for {seconds / 60:.0f} min",
        behaviour=(
            f"{result['sent']} requests, p50 {latency['p50_ms']:.1f} ms, "
            f"p99 {latency['p99_ms']:.1f} ms; memory {_mib(start_rss)} after "
            f"warm-up, {_mib(end_rss)} at the end ({growth:+.1%})"
        ),
        requests=result["sent"],
        errors=errors,
        events_lost=0,
        passed=errors == 0 and growth < 0.10,
        command=COMMAND.format(scenario="soak"),
        details={
            "rss": rss,
            "rss_by_role": rss_by_role,
            "growth": growth,
            "load": _load_summary(result),
        },
    )


# --------------------------------------------------------------------------- helpers


COMPUTE_FAULTS = {
    "killed": "SIGKILL of the compute process",
    "paused": "SIGSTOP of the compute process (never continued)",
}


def compute_faults(
    fixture: Fixture,
    *,
    duration: float = 16.0,
    fault_at: float = 5.0,
    concurrency: int = 4,
    cases: tuple[str, ...] = tuple(COMPUTE_FAULTS),
) -> list[FaultRow]:
    """Kill or stop the worker's compute process during a load run of /recommend: what
    failed, how long until the replacement answered, what memory did."""
    import signal

    rows = []
    for case in cases:
        with private_stack(fixture, f"compute-{case}") as (_, service, _):
            mix = {"events_share": 0.0, "user_id_share": 0.0, "repeat_share": 0.0}
            recorder, thread, holder = _recorded_load(
                service, fixture, mix, duration=duration, concurrency=concurrency
            )
            time.sleep(fault_at)
            memory_before = service.rss_by_role()
            (child,) = service.pids_by_role()["compute"]
            faulted_at = time.monotonic() - recorder.t0
            os.kill(child, signal.SIGKILL if case == "killed" else signal.SIGSTOP)
            result = _finish(thread, holder, duration + 60)
            memory_after = service.rss_by_role()
            replacements = service.pids_by_role()["compute"]
            if case == "paused":
                with contextlib.suppress(ProcessLookupError):  # the watchdog's work, we hope
                    os.kill(child, signal.SIGKILL)  # never left behind, whatever happened
        failed = [r for r in recorder.rows if r["status"] != 200]
        answers = sorted(r["t"] for r in recorder.rows if r["status"] == 200)
        after = [faulted_at, *(t for t in answers if t >= faulted_at)]
        # Time to recover: the longest stretch from the fault on in which no request was
        # answered (the requests the child held wait that long, then are answered).
        gaps = [later - earlier for earlier, later in zip(after, after[1:], strict=False)]
        recovery = max(gaps) if gaps else None
        # Served again: every request answered after the longest stretch succeeded.
        steady = recovery is not None and all(
            r["status"] == 200 for r in recorder.rows if r["t"] >= faulted_at + recovery
        )
        passed = steady and child not in replacements and len(replacements) == 1
        rows.append(
            FaultRow(
                fault=f"{COMPUTE_FAULTS[case]} under load ({concurrency} clients)",
                behaviour=(
                    f"{len(failed)} of {len(recorder.rows)} requests failed "
                    f"({_statuses(failed)}); answers paused {_seconds(recovery)} at most "
                    f"after the fault, all answered from then on; compute "
                    f"process replaced ({len(replacements)} running); memory "
                    f"{_mib(sum(memory_before.values()))} before, "
                    f"{_mib(sum(memory_after.values()))} after"
                ),
                requests=len(recorder.rows),
                errors=len(failed),
                events_lost=0,
                passed=passed,
                command=COMMAND.format(scenario="compute"),
                details={
                    "fault_at_s": faulted_at,
                    "recovery_s": recovery,
                    "failed_by_status": _count_statuses(failed),
                    "rss_before": memory_before,
                    "rss_after": memory_after,
                    "load": _load_summary(result),
                },
            )
        )
    return rows


def _count_statuses(rows: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[str(row["status"])] = counts.get(str(row["status"]), 0) + 1
    return counts


def _statuses(rows: list[dict]) -> str:
    counts = _count_statuses(rows)
    return ", ".join(f"{n} x {status}" for status, n in sorted(counts.items())) or "none"


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


def _history_bodies(data, count: int, length: int = 20) -> list[bytes]:
    """/recommend bodies of the last ``length`` events of the first ``count`` users."""
    bodies = []
    for user in range(min(count, data.n_users)):
        start, end = int(data.offsets[user]), int(data.offsets[user + 1])
        history = [
            {"item_id": str(data.item_map.raw[item]), "ts": int(ts)}
            for item, ts in zip(
                data.items[max(start, end - length) : end],
                data.timestamps[max(start, end - length) : end],
                strict=True,
            )
        ]
        bodies.append(json.dumps({"history": history, "k": 10}).encode())
    return bodies


async def _fixed_load(url: str, bodies: list[bytes], concurrency: int, stop, seen: list) -> None:
    import httpx

    headers = JSON
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def worker(offset: int) -> None:
            index = offset
            while not stop.is_set():
                body = index % len(bodies)
                index += concurrency
                try:
                    response = await client.post(
                        "/recommend", content=bodies[body], headers=headers
                    )
                except httpx.HTTPError:
                    seen.append((body, 0, None, ()))
                    continue
                if response.status_code == 200:
                    payload = response.json()
                    items = tuple(i["item_id"] for i in payload["items"])
                    seen.append((body, 200, payload["bundle"], items))
                else:
                    seen.append((body, response.status_code, None, ()))

        await asyncio.gather(*(worker(i) for i in range(concurrency)))


def _tail_serves(seen: list, since: int, bundle: str, count: int) -> bool:
    tail = seen[since:]
    return len(tail) >= count and all(b == bundle for _, _, b, _ in tail[-count:])


def _sample_rss(
    service: ServiceProcess,
    stop,
    out: list,
    t0: float,
    *,
    every: float,
    by_role: list | None = None,
) -> None:
    """(seconds, total bytes) every ``every`` s into ``out``; with ``by_role``, also
    (seconds, {"workers": bytes, "compute": bytes}), so that growth names its process."""
    while not stop.wait(every):
        roles = service.rss_by_role()
        out.append((time.monotonic() - t0, sum(roles.values())))
        if by_role is not None:
            by_role.append((out[-1][0], roles))


def _load_summary(result: dict) -> dict:
    keys = (
        "sent",
        "throughput_rps",
        "latency_ms",
        "errors",
        "errors_by_status",
        "errors_by_exception",
        "cache",
        "dropped",
    )
    return {k: result[k] for k in keys if k in result}


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _mib(value: float) -> str:
    return f"{value / 2**20:.0f} MiB"


def markdown(rows: list[FaultRow]) -> str:
    """The table of docs/RELIABILITY.md."""
    lines = [
        "| fault | what the service did | requests | errors | events lost | passed | command |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row.fault} | {row.behaviour} | {row.requests} | {row.errors} | "
            f"{row.events_lost} | {'yes' if row.passed else '**no**'} | `{row.command}` |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.faults",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    parser.add_argument("--models-dir", type=Path, help="with bundles --bundles A B")
    parser.add_argument("--bundles", nargs=2, default=["faults-a", "faults-b"])
    parser.add_argument("--data", default="synthetic", help="data the bundles were trained on")
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder")
    parser.add_argument("--outage-seconds", type=float, default=8.0)
    parser.add_argument("--load-seconds", type=float, default=30.0)
    parser.add_argument("--reloads", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--soak-seconds", type=float, default=600.0)
    parser.add_argument("--soak-rate", type=float, default=50.0)
    parser.add_argument("--out", type=Path, help="append the rows to this JSON file")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    quiet_http_logs()  # a fault run sends tens of thousands of requests
    if shutil.which("redis-server") is None:
        print("redis-server is not installed", file=sys.stderr)
        return 2

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="recserve-faults-"))
    workdir.mkdir(parents=True, exist_ok=True)
    from training.data import build_sequences
    from training.datasets import load_dataset

    data = build_sequences(load_dataset(args.data))
    if args.models_dir:
        fixture = Fixture(args.models_dir, tuple(args.bundles), data, workdir)
    else:
        LOG.info("training two small bundles on %s in %s", args.data, workdir)
        fixture = build_fixture(workdir, data)
    scenarios = SCENARIOS if args.scenario == "all" else (args.scenario,)
    rows: list[FaultRow] = []
    for scenario in scenarios:
        LOG.info("scenario %s", scenario)
        if scenario == "redis-outage":
            rows.append(
                redis_outage(
                    fixture,
                    duration=args.load_seconds,
                    outage_at=10.0,
                    outage_for=args.outage_seconds,
                )
            )
        elif scenario == "reload":
            rows.append(reload_under_load(fixture, reloads=args.reloads, workers=args.workers))
        elif scenario == "compute":
            rows.extend(compute_faults(fixture))
        elif scenario == "bad-bundle":
            rows.extend(bad_bundles(fixture))
        else:
            rows.append(soak(fixture, seconds=args.soak_seconds, rate=args.soak_rate))
        print(json.dumps(asdict(rows[-1]), default=str)[:2000], flush=True)
    if args.out:
        previous = json.loads(args.out.read_text()) if args.out.exists() else []
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(previous + [asdict(r) for r in rows], indent=2))
    print(markdown(rows) if args.markdown else "\n".join(r.behaviour for r in rows))
    return 0 if all(r.passed for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Serving benchmark: the service on loopback, driven by wrk, against its own floor and ceiling.

    .venv/bin/python -m bench.serving --models-dir models --bundle perf-1m \
        --concurrency 1 4 32 --duration 15 --out docs/serving.json

In one run it measures:
- the in-process floor: one request through the pipeline (encode + retrieve + rerank, no
  HTTP), median over many requests, for a cache miss and a cache hit;
- /recommend over HTTP with wrk (a C client, so the load generator takes little of the two
  cores) at each concurrency: throughput, p50/p90/p99/max, errors, and the server's CPU
  milliseconds per request (from /proc of the server process);
- the framework ceiling: /healthz of the same server under the same wrk settings.
- with ``--peer``: the plain server a user would write instead (bench/plain_peer.py: the
  same work request by request, no batching, cache or Redis) on the same bundle, driven by
  the same request stream (the same wrk seed) right after recserve at each concurrency;
  the ratios are printed (throughput, p50 above the peer's). ``--rerank on|off`` sets the
  requests' rerank field for both.

Over HTTP every request is a fresh random history over the bundle's catalogue (20 events,
built by wrk's Lua script, seeded anew for every run), so every /recommend is a cache
miss; ``--repeat N`` makes wrk cycle N fixed bodies instead (cache hits after the first
round), for a share ``--repeat-share`` of the requests (default all; e.g. 0.8 mixes 20%
fresh misses). Each run records the share of cache hits the server counted. The server
serves a hard-linked copy of the bundle in a temporary models dir (CURRENT must
name a bundle inside its own dir; hard links cost no disk).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.processes import PeerProcess, ServiceProcess  # noqa: E402

LUA = """
local bodies = {%(bodies)s}
local n_items, length, i = %(n_items)d, 20, 0
math.randomseed(%(seed)d)
-- With no fixed bodies every request is a fresh random history: a cache miss.
local function random_body()
  local events, ts = {}, 1700000000
  for e = 1, length do
    ts = ts + math.random(60, 86400)
    events[e] = string.format('{"item_id":"%%d","ts":%%d}', math.random(1, n_items), ts)
  end
  local user = %(with_users)s and string.format('"user_id":"u%%d",', math.random(1, 1000000)) or ''
  return '{' .. user .. '"k":10,%(rerank)s"history":[' .. table.concat(events, ",") .. ']}'
end
request = function()
  local body
  if #bodies > 0 and math.random() < %(repeat_share)f then
    i = i %% #bodies + 1
    body = bodies[i]
  else
    body = random_body()
  end
  return wrk.format("POST", "/recommend", {["Content-Type"] = "application/json"}, body)
end
done = function(summary, latency, requests)
  io.write(string.format(
    'WRKJSON {"requests": %%d, "duration_us": %%d, "errors": %%d, "non2xx": %%d, '
    .. '"p50_ms": %%.3f, "p90_ms": %%.3f, "p99_ms": %%.3f, "max_ms": %%.3f}\\n',
    summary.requests, summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000))
end
"""


def request_bodies(
    catalogue_size: int, count: int, length: int, *, k: int, seed: int, rerank: bool | None = None
) -> list[str]:
    """Distinct JSON bodies: random histories of ``length`` events over the catalogue
    (``rerank``: the body's field; None leaves it out, the bundle's default)."""
    rng = np.random.default_rng(seed)
    bodies = []
    for _ in range(count):
        items = rng.integers(1, catalogue_size + 1, length)
        stamps = 1_700_000_000 + np.cumsum(rng.integers(60, 86_400, length))
        history = [{"item_id": str(i), "ts": int(t)} for i, t in zip(items, stamps, strict=True)]
        asked = {} if rerank is None else {"rerank": rerank}
        bodies.append(json.dumps({"history": history, "k": k, **asked}))
    return bodies


def in_process_floor(
    models_dir: Path,
    bundle: str,
    bodies: list[str],
    repeats: int,
    *,
    device: str = "cpu",
    index_device: str | None = None,
) -> dict:
    """Median milliseconds of one request through the pipeline, miss and hit, no HTTP.

    Threads as the server sets them: one intra-op thread per ONNX session, one thread
    computing the batches with one-thread native kernels. The batches are computed in this
    process (the server sends them to its compute process), so the floor has no IPC.
    """
    from concurrent.futures import ThreadPoolExecutor

    from service.bundle import load_bundle
    from service.cache import InMemoryBehaviourCache
    from service.compute import ThreadCompute
    from service.devices import limit_native_threads
    from service.recommender import Recommender

    loaded = load_bundle(models_dir, bundle, device=device, threads=1, index_device=index_device)
    executor = ThreadPoolExecutor(1, initializer=limit_native_threads, initargs=(1,))
    recommender = Recommender(loaded, compute=ThreadCompute(loaded, executor))

    async def run(cache, body) -> float:
        request = json.loads(body)
        events = [(e["item_id"], e["ts"]) for e in request["history"]]
        started = time.perf_counter()
        await recommender.recommend(
            events, k=request["k"], rerank=request.get("rerank"), cache=cache
        )
        return (time.perf_counter() - started) * 1000

    async def measure() -> dict:
        cache = InMemoryBehaviourCache(history_cap=200, ttl_seconds=3600)
        misses = [await run(cache, body) for body in bodies[:repeats]]
        await recommender.drain()
        hits = [await run(cache, body) for body in bodies[:repeats]]
        return {
            "miss_p50_ms": float(np.median(misses)),
            "miss_p99_ms": float(np.percentile(misses, 99)),
            "hit_p50_ms": float(np.median(hits)),
            "hit_p99_ms": float(np.percentile(hits, 99)),
            "hit_cheaper": float(np.median(misses) / np.median(hits)),
            "requests": repeats,
            "placement": placement(loaded),
        }

    try:
        return asyncio.run(measure())
    finally:
        executor.shutdown()


def run_wrk(url: str, concurrency: int, duration: int, lua: Path | None) -> dict:
    command = ["wrk", "-t1", f"-c{concurrency}", f"-d{duration}s", "--latency", "--timeout", "5s"]
    if lua is not None:
        command += ["-s", str(lua)]
    output = subprocess.run(command + [url], capture_output=True, text=True, check=True).stdout
    if lua is not None:
        line = next(x for x in output.splitlines() if x.startswith("WRKJSON"))
        result = json.loads(line[len("WRKJSON ") :])
    else:
        result = parse_wrk_text(output)
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


def parse_wrk_text(output: str) -> dict:
    """Requests, duration and latency percentiles from wrk's plain --latency report."""

    def ms(text: str) -> float:
        units = {"us": 1e-3, "ms": 1.0, "s": 1000.0}
        for unit in ("us", "ms", "s"):
            if text.endswith(unit):
                return float(text[: -len(unit)]) * units[unit]
        return float(text)

    result = {"errors": 0, "non2xx": 0}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in ("50%", "90%", "99%"):
            result[f"p{parts[0][:-1]}_ms"] = ms(parts[1])
        if "requests in" in line:
            result["requests"] = int(parts[0])
            result["duration_us"] = ms(parts[3].rstrip(",")) * 1000
        if line.strip().startswith("Latency") and len(parts) >= 4:
            result["max_ms"] = ms(parts[3])
        if "Non-2xx" in line:
            result["non2xx"] = int(parts[-1])
    return result


def serve_copy(models_dir: Path, bundle: str) -> Path:
    """A temporary models dir holding a hard-linked copy of ``bundle``, CURRENT naming it."""
    from service.bundle import set_current

    root = Path(tempfile.mkdtemp(prefix="recserve-bench-"))
    shutil.copytree(models_dir / bundle, root / bundle, copy_function=os.link)
    set_current(root, bundle)
    return root


def placement(loaded) -> dict:
    """Where the default retriever's stages ran, and its index."""
    from service.bundle import placement as stages

    retriever = loaded.retrievers[loaded.default_encoder]
    return {**stages(loaded)[retriever.name], "index_factory": retriever.index.spec.factory}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--bundle", default="perf-1m")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 32])
    parser.add_argument("--duration", type=int, default=15, help="seconds per wrk run")
    parser.add_argument("--repeat", type=int, default=0, help="cycle N fixed bodies (hits)")
    parser.add_argument(
        "--repeat-share",
        type=float,
        default=1.0,
        help="with --repeat: the share of requests that repeat a fixed body (the rest are "
        "fresh random histories, i.e. misses)",
    )
    parser.add_argument("--floor-requests", type=int, default=300)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--profile",
        type=Path,
        help="py-spy the worker and its compute process during an extra run at the highest "
        "concurrency; collapsed stacks go to FILE-worker.txt and FILE-compute.txt, the top "
        "functions into the JSON",
    )
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        help="a service setting for the server, e.g. --setting batch_wait_ms=1 (repeatable)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "gpu", "auto"],
        help="RECSERVE_DEVICE of the server and of the floor (gpu: onnxruntime's CUDA "
        "provider and faiss GPU indexes, failing when either is missing)",
    )
    parser.add_argument(
        "--index-device",
        choices=["cpu", "gpu", "auto"],
        help="RECSERVE_INDEX_DEVICE of the server and of the floor: where faiss searches, "
        "when not on --device (e.g. --device cpu --index-device gpu)",
    )
    parser.add_argument(
        "--user-ids",
        action="store_true",
        help="give each fresh request a random user id (of a million) beside its history, "
        "as a client that logs impressions per user does",
    )
    parser.add_argument(
        "--rerank",
        choices=["default", "on", "off"],
        default="default",
        help="the requests' rerank field (default: left out, the bundle's default)",
    )
    parser.add_argument(
        "--peer",
        action="store_true",
        help="also measure bench/plain_peer.py (the plain FastAPI server a user would write) "
        "on the same bundle and the same request stream, right after recserve at each "
        "concurrency, and print the ratios",
    )
    parser.add_argument("--peer-workers", type=int, default=1)
    parser.add_argument("--server-log", type=Path, help="write the server's output to FILE")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "serving.json")
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        print("wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 2

    from service.bundle import read_manifest

    manifest = read_manifest(args.models_dir / args.bundle)
    n_items = manifest["dataset"]["items"]
    rerank = {"default": None, "on": True, "off": False}[args.rerank]
    bodies = request_bodies(
        n_items, max(args.floor_requests, args.repeat), 20, k=10, seed=0, rerank=rerank
    )
    print("in-process floor ...", flush=True)
    floor = in_process_floor(
        args.models_dir,
        args.bundle,
        bodies,
        args.floor_requests,
        device=args.device,
        index_device=args.index_device,
    )
    print(json.dumps(floor), flush=True)

    served = serve_copy(args.models_dir, args.bundle)
    prefix = f"bench{args.port or os.getpid()}"
    server = ServiceProcess(
        {
            "RECSERVE_MODELS_DIR": str(served),
            "RECSERVE_ADMIN_ENABLED": "0",
            "RECSERVE_KEY_PREFIX": prefix,
            "RECSERVE_RELOAD_POLL_SECONDS": "0",
            "RECSERVE_DEVICE": args.device,
            **({"RECSERVE_INDEX_DEVICE": args.index_device} if args.index_device else {}),
            **extra_settings(args.setting),
        },
        port=args.port or None,
        workers=args.workers,
        log_path=args.server_log,
    )
    results: dict = {
        "bundle": args.bundle,
        "items": n_items,
        "floor": floor,
        "repeat": args.repeat,
        "repeat_share": args.repeat_share if args.repeat else 0.0,
        "workers": args.workers,
        "device": args.device,
        "index_device": args.index_device or args.device,
        "settings": extra_settings(args.setting),
        "user_ids": args.user_ids,
        "rerank": args.rerank,
        "peer_workers": args.peer_workers if args.peer else None,
        "runs": [],
    }
    peer = (
        PeerProcess(
            served,
            args.bundle,
            workers=args.peer_workers,
            log_path=args.server_log and args.server_log.with_suffix(".peer.log"),
        )
        if args.peer
        else None
    )
    quoted = ",".join(json.dumps(body) for body in bodies[: args.repeat])
    seeds = itertools.count(1)

    def script(seed: int | None = None) -> Path:
        # Every wrk run against recserve draws its fresh histories from its own seed: with
        # one seed for all, each run would replay the previous runs' "fresh" histories as
        # cache hits. The peer replays recserve's seed: the same request stream.
        lua = served / "bodies.lua"
        values = {
            "bodies": quoted,
            "n_items": n_items,
            "repeat_share": args.repeat_share,
            "with_users": "true" if args.user_ids else "false",
            "rerank": "" if rerank is None else f'"rerank":{json.dumps(rerank)},',
        }
        lua.write_text(LUA % {**values, "seed": seed if seed is not None else next(seeds)})
        return lua

    def measure(process: ServiceProcess, target: str, concurrency: int, lua: Path | None) -> dict:
        before = process.cpu_seconds()
        roles_before = process.cpu_by_role()
        machine_before = machine_counters()
        run = run_wrk(process.url + target, concurrency, args.duration, lua)
        machine = {k: v - machine_before[k] for k, v in machine_counters().items()}
        per_request = 1000 / max(run["requests"], 1)
        # The whole machine (wrk, Redis and the kernel included): whether the cores were
        # the limit, and how often it switched tasks for each request.
        run["machine_busy_share"] = 1 - machine["idle"] / max(machine["total"], 1)
        run["context_switches_per_request"] = machine["switches"] / max(run["requests"], 1)
        run["cpu_ms_per_request"] = (process.cpu_seconds() - before) * per_request
        run["cpu_ms_per_request_by_role"] = {
            role: (seconds - roles_before.get(role, 0.0)) * per_request
            for role, seconds in process.cpu_by_role().items()
        }
        # Resident memory once the run is over: one copy of the models or several.
        run["rss_mb_by_role"] = {role: size / 2**20 for role, size in process.rss_by_role().items()}
        run["pss_mb_by_role"] = {role: size / 2**20 for role, size in process.pss_by_role().items()}
        run.update(target=target, concurrency=concurrency)
        return run

    try:
        server.start()
        if peer is not None:
            peer.start(timeout=300)
        for concurrency in args.concurrency:
            seed = next(seeds)
            counts = server_counts(server.url)
            run = measure(server, "/recommend", concurrency, script(seed))
            new = {k: v - counts.get(k, 0) for k, v in server_counts(server.url).items()}
            outcomes = sum(new.get(k, 0) for k in ("hit", "miss", "bypass", "answer"))
            run["cache_hit_share"] = new.get("hit", 0) / max(outcomes, 1)
            run["answer_share"] = new.get("answer", 0) / max(outcomes, 1)
            run["mean_batch"] = new.get("batched", 0) / max(new.get("batches", 0), 1)
            runs = [run]
            if peer is not None:
                peer_run = measure(peer, "/recommend", concurrency, script(seed))
                runs.append({**peer_run, "peer": True})
            runs.append(measure(server, "/healthz", concurrency, None))
            for run in runs:
                results["runs"].append(run)
                print(json.dumps(run), flush=True)
        if args.profile:
            # An extra run, so that the samplers' CPU is in none of the measured ones. The
            # (first) worker is sampled while it holds the GIL (what bounds it), its compute
            # process, or the shared one, whenever it runs.
            concurrency = max(args.concurrency)
            roles = server.pids_by_role()
            targets = {"worker": (roles["workers"][0], True)}
            computing = roles["compute"]
            if computing:
                targets["compute"] = (computing[0], False)
            profilers = {
                name: start_profile(pid, args.duration, profile_path(args.profile, name), gil)
                for name, (pid, gil) in targets.items()
            }
            run_wrk(server.url + "/recommend", concurrency, args.duration, script())
            results["profile"] = {"concurrency": concurrency}
            for name, profiler in profilers.items():
                profiler.wait(timeout=args.duration + 60)
                path = profile_path(args.profile, name)
                results["profile"][name] = summarise_profile(path)
    finally:
        server.stop()
        if peer is not None:
            peer.stop()
        shutil.rmtree(served, ignore_errors=True)
        forget_keys(os.environ.get("RECSERVE_REDIS_URL", default_redis_url()), prefix)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(table(results))
    if peer is not None:
        print(peer_table(results))
    return 0


def table(results: dict) -> str:
    rows = [
        "| target | concurrency | req/s | p50 ms | p99 ms | max ms | errors | CPU ms/req "
        "| worker / compute | machine busy | switches/req | cache hits | answers reused | batch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in results["runs"]:
        roles = run.get("cpu_ms_per_request_by_role", {})
        split = f"{roles['workers']:.2f} / {roles['compute']:.2f}" if roles.get("compute") else "-"
        hits = f"{run['cache_hit_share']:.0%}" if "cache_hit_share" in run else "-"
        batch = f"{run['mean_batch']:.1f}" if "mean_batch" in run else "-"
        answers = f"{run['answer_share']:.0%}" if "answer_share" in run else "-"
        target = "peer /recommend" if run.get("peer") else run["target"]
        rows.append(
            f"| {target} | {run['concurrency']} | {run['rps']:.0f} | {run['p50_ms']:.2f} "
            f"| {run['p99_ms']:.2f} | {run['max_ms']:.1f} | {run['errors'] + run['non2xx']} "
            f"| {run['cpu_ms_per_request']:.2f} | {split} | {run['machine_busy_share']:.0%} "
            f"| {run['context_switches_per_request']:.1f} | {hits} | {answers} | {batch} |"
        )
    return "\n".join(rows)


def peer_table(results: dict) -> str:
    """recserve against the plain peer at each concurrency: throughput ratio, p50 and p99
    differences."""
    rows = [
        "| concurrency | recserve req/s | p50 / p99 ms | peer req/s | p50 / p99 ms "
        "| throughput ratio | p50 above peer ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    ours = {
        r["concurrency"]: r
        for r in results["runs"]
        if r["target"] == "/recommend" and not r.get("peer")
    }
    for run in results["runs"]:
        if not run.get("peer"):
            continue
        mine = ours[run["concurrency"]]
        rows.append(
            f"| {run['concurrency']} | {mine['rps']:.0f} | {mine['p50_ms']:.2f} / "
            f"{mine['p99_ms']:.2f} | {run['rps']:.0f} | {run['p50_ms']:.2f} / {run['p99_ms']:.2f} "
            f"| {mine['rps'] / max(run['rps'], 1e-9):.2f} | {mine['p50_ms'] - run['p50_ms']:+.2f} |"
        )
    return "\n".join(rows)


def start_profile(pid: int, seconds: int, out: Path, gil: bool) -> subprocess.Popen:
    """py-spy sampling every thread of ``pid`` for ``seconds`` without pausing it;
    collapsed stacks. ``gil``: only samples of the thread holding the GIL; otherwise
    ``--idle`` as well, because faiss and onnxruntime run without the GIL, which py-spy
    would otherwise count as idle; their time shows as the Python frame that called them
    (native frames need pausing, and their unwinding through faiss gave nothing)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen(
        [py_spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "200"]
        + ["--format", "raw", "--nonblocking", "--gil" if gil else "--idle"]
        + ["--output", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def machine_counters() -> dict[str, int]:
    """Jiffies of all CPUs (total, and idle with I/O wait) and context switches since boot
    (Linux /proc/stat)."""
    counters = {"total": 0, "idle": 0, "switches": 0}
    for line in Path("/proc/stat").read_text().splitlines():
        fields = line.split()
        if fields[0] == "cpu":
            ticks = [int(value) for value in fields[1:]]
            counters["total"], counters["idle"] = sum(ticks[:8]), ticks[3] + ticks[4]
        elif fields[0] == "ctxt":
            counters["switches"] = int(fields[1])
    return counters


def server_counts(url: str) -> dict[str, float]:
    """The server's /recommend cache outcomes so far (hit, miss, bypass, answer) and its batches
    (batches, batched: requests in them), from /metrics."""
    import httpx

    counts = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith("recserve_cache_total{"):
            counts[name.split('result="')[1].split('"')[0]] = float(value)
        elif name == "recserve_batch_size_count":
            counts["batches"] = float(value)
        elif name == "recserve_batch_size_sum":
            counts["batched"] = float(value)
    return counts


def profile_path(base: Path, process: str) -> Path:
    """Where the collapsed stacks of one profiled process go: base-worker.txt, ..."""
    return base.with_name(f"{base.stem}-{process}{base.suffix or '.txt'}")


def default_redis_url() -> str:
    """The Redis the server uses when RECSERVE_REDIS_URL is not set: the settings' default."""
    from service.settings import Settings

    return Settings.model_fields["redis_url"].default


def forget_keys(url: str, prefix: str) -> int:
    """Delete the keys the benchmark's server wrote (tens of thousands of cache entries
    of random histories that nobody will ask for again); how many."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5)
    deleted = 0
    try:
        keys = []
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            keys.append(key)
            if len(keys) == 1000:
                deleted += client.delete(*keys)
                keys.clear()
        if keys:
            deleted += client.delete(*keys)
    except redis.exceptions.RedisError as exc:
        print(f"could not delete the benchmark's keys {prefix}:*: {exc}", file=sys.stderr)
    finally:
        client.close()
    return deleted


# Leaf frames of waiting: an idle pool thread, the event loop in its poll, the compute
# process in its poll for the next batch.
WAITING = ("Condition.wait", "Queue.get", "select", "_run_once")


def summarise_profile(path: Path, top: int = 25) -> dict:
    """Share of busy samples per function: where it ran (self) and what it was under
    (total). Samples of threads waiting for work (an idle pool thread, the event loop in
    its poll) are counted apart."""
    own: dict[str, int] = {}
    under: dict[str, int] = {}
    samples = waiting = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f.split(" (")[0] for f in stack.split(";")]
        if frames[-1] in WAITING:
            waiting += int(count)
            continue
        n = int(count)
        samples += n
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            under[frame] = under.get(frame, 0) + n

    def share(table: dict[str, int]) -> list[tuple[str, float]]:
        ranked = sorted(table.items(), key=lambda kv: -kv[1])[:top]
        return [(name, count / max(samples, 1)) for name, count in ranked]

    return {"samples": samples, "waiting": waiting, "self": share(own), "total": share(under)}


def extra_settings(pairs: list[str]) -> dict[str, str]:
    """``--setting KEY=VALUE`` pairs as RECSERVE_* environment variables."""
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--setting wants KEY=VALUE, got {pair!r}")
        settings[f"RECSERVE_{key.upper()}"] = value
    return settings


if __name__ == "__main__":
    sys.exit(main())

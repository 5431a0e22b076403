"""What the living catalogue costs: serving beside added and withdrawn items, applying a
write, and the write API's throughput.

    .venv/bin/python -m bench.catalogue --models-dir models --bundle perf-1m \
        --added 10000 --withdrawn 1000 --requests 300 --rounds 3 --out docs/catalogue_bench.json

1. **Serving** (in process, as ``bench.filters`` times it: CPU, one-thread kernels, batches
   computed in one thread, each request alone through ``Recommender``, misses then hits,
   k 10, 200 candidates, rerank on), for three catalogues of the same bundle:
   ``bundle`` (no write), ``added`` (``--added`` items written, each with a vector: a
   seeded random bundle item's, with noise of a tenth of its norm, so they compete with
   the trained items for the same users) and ``added+withdrawn`` (also ``--withdrawn``
   of the bundle's most popular items withdrawn). Every round draws fresh histories and
   rotates the order of the cases; medians of the rounds' medians. Also how many answers
   hold an added item.
2. **Applying writes**: how long a process takes to build what it serves
   (``ServedCatalogue.applied``) from the bundle and every record (a start or a reload),
   and for one more write on top of them (what each write costs each process), with and
   without the vectors (a worker in process mode builds none; its compute process does).
3. **The write API** over HTTP (``--http``): two replicas (real servers of one worker
   and its compute process each, one deployment) on the bundle and the shared Redis under
   a private key prefix. Single-item PUTs to the first from ``--writers`` concurrent
   clients, then bulk writes of 100 items: writes per second and latency percentiles of
   the acknowledgement, which comes once the answering worker serves the write. Then
   visibility: ``--probes`` PUTs one after another to the first replica, each followed by
   GETs of the item from the second every 2 ms until it answers 200 (its worker serves a
   write only once its compute process has it): the seconds from the acknowledgement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.filters import HISTORY, K, time_requests  # noqa: E402
from bench.serving import request_bodies  # noqa: E402

BULK = 100


def added_records(bundle, count: int, seed: int) -> dict:
    """``count`` new items, each with a vector per retriever near a random bundle item's."""
    from service.catalogue import ItemRecord

    rng = np.random.default_rng(seed)
    n = bundle.catalogue.n_items
    like = rng.integers(1, n + 1, count)
    records = {}
    vectors = {}
    for name, retriever in bundle.retrievers.items():
        base = np.asarray(retriever.item_vectors[like], dtype=np.float32)
        noise = rng.standard_normal(base.shape).astype(np.float32)
        noise *= 0.1 * np.linalg.norm(base, axis=1, keepdims=True) / np.sqrt(base.shape[1])
        vectors[name] = base + noise
    for row in range(count):
        records[f"added-{row}"] = ItemRecord(
            title=f"Added item {row}",
            vectors=tuple((name, vectors[name][row]) for name in bundle.retrievers),
            vectors_bundle=bundle.name,
        )
    return records


def withdrawals(bundle, count: int) -> dict:
    from service.catalogue import ItemRecord

    top = bundle.catalogue.popularity_order[:count]
    return {
        str(raw): ItemRecord(available=False, withdrawn=True)
        for raw in bundle.catalogue.raw_ids[top]
    }


def serving(bundle, cases: dict, *, requests: int, rounds: int, seed: int) -> dict:
    """Each case's recommender timed ``rounds`` times (see the module docstring)."""
    from concurrent.futures import ThreadPoolExecutor

    from service.compute import ThreadCompute
    from service.devices import limit_native_threads
    from service.recommender import Recommender

    executor = ThreadPoolExecutor(1, initializer=limit_native_threads, initargs=(1,))
    recommenders = {}
    for name, records in cases.items():
        recommender = Recommender(bundle, compute=ThreadCompute(bundle, executor))
        if records:
            asyncio.run(recommender.apply_catalogue(1, records))
        recommenders[name] = recommender
    names = list(cases)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    added = {name: [] for name in names}
    n = bundle.catalogue.n_items
    try:
        for recommender in recommenders.values():
            time_requests(recommender, request_bodies(n, 20, HISTORY, k=K, seed=seed), None)
        for round_ in range(rounds):
            bodies = request_bodies(n, requests, HISTORY, k=K, seed=seed + 1 + round_)
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                result = time_requests(recommenders[name], bodies, None)
                runs[name].append(result)
                print(f"round {round_ + 1} {name}: {json.dumps(result)}", flush=True)
            added_in = [
                asyncio.run(answer_holds_added(recommenders[name], bodies[:50])) for name in names
            ]
            for name, count in zip(names, added_in, strict=True):
                added[name].append(count)
    finally:
        executor.shutdown()
    return {
        name: {
            **{
                key: float(np.median([r[key] for r in results]))
                for key in ("miss_p50_ms", "miss_p99_ms", "hit_p50_ms", "hit_p99_ms")
            },
            "short_answers": sum(r["short_answers"] for r in results),
            "answers_with_an_added_item": f"{sum(added[name])} of {50 * rounds}",
            "rounds": [r["miss_p50_ms"] for r in results],
        }
        for name, results in runs.items()
    }


async def answer_holds_added(recommender, bodies: list[str]) -> int:
    count = 0
    for body in bodies:
        events = [(e["item_id"], e["ts"]) for e in json.loads(body)["history"]]
        answer = await recommender.recommend(events, k=K)
        count += any(item["item_id"].startswith("added-") for item in answer.items)
    return count


def applying(bundle, records: dict, repeats: int = 5) -> dict:
    """Milliseconds to build the served catalogue from every record, and for one more
    write on top, with the vectors (a compute process) and without (a process-mode
    worker); medians of ``repeats``."""
    from service.catalogue import ItemRecord
    from service.live_catalogue import CatalogueChange, ServedCatalogue

    first = next(iter(records.values()))
    one = {
        "one-more": ItemRecord(title="One more", vectors=first.vectors, vectors_bundle=bundle.name)
    }
    result = {}
    for embed in (True, False):
        full, more = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            served = ServedCatalogue.of_records(bundle, 1, records, embed=embed)
            full.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            change = CatalogueChange(2, one, served.assign(bundle, one))
            served.applied(bundle, change, embed=embed)
            more.append((time.perf_counter() - started) * 1000)
        where = "with vectors" if embed else "without vectors"
        result[where] = {
            "all_records_ms": float(np.median(full)),
            "one_more_ms": float(np.median(more)),
        }
    return result


def write_api(
    models_dir: Path, bundle, *, writes: int, writers: int, bulks: int, probes: int
) -> dict:
    """Writes per second and visibility across replicas; see the module docstring."""
    import httpx
    import redis

    from service.bundle import set_current
    from tests.servers import UvicornService
    from tests.service.conftest import ADMIN_TOKEN, SHARED_REDIS_URL, delete_prefix, server_settings

    prefix = f"bench{uuid.uuid4().hex[:12]}"
    # The servers serve models/CURRENT: a directory of their own names this bundle, its
    # files hard-linked (bundles refuse links that lead out of their folder).
    served = Path(tempfile.mkdtemp(prefix="recserve-bench-", dir=models_dir.parent)) / "models"
    shutil.copytree(bundle.path, served / bundle.name, copy_function=os.link)
    set_current(served, bundle.name)
    settings = {**server_settings(served, prefix), "RECSERVE_DEPLOYMENT": prefix}
    logs = served.parent
    service = UvicornService(settings, log_path=logs / "first.log")
    replica = UvicornService(settings, log_path=logs / "second.log")
    service.start(timeout=600)
    replica.start(timeout=600)
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    vectors = {
        name: [float(v) for v in np.asarray(r.item_vectors[1])]
        for name, r in bundle.retrievers.items()
    }
    latencies: list[float] = []
    failures: list[str] = []

    def writer(offset: int) -> None:
        with httpx.Client(base_url=service.url, timeout=30, headers=headers) as http:
            for i in range(offset, writes, writers):
                started = time.perf_counter()
                response = http.put(f"/items/w-{i}", json={"embeddings": vectors})
                latencies.append((time.perf_counter() - started) * 1000)
                if response.status_code != 200:
                    failures.append(response.text)

    try:
        started = time.perf_counter()
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        single_seconds = time.perf_counter() - started
        bulk_latencies = []
        with httpx.Client(base_url=service.url, timeout=60, headers=headers) as http:
            started = time.perf_counter()
            for b in range(bulks):
                items = [{"item_id": f"b-{b}-{i}", "embeddings": vectors} for i in range(BULK)]
                began = time.perf_counter()
                response = http.post("/items/bulk", json={"put": items})
                bulk_latencies.append((time.perf_counter() - began) * 1000)
                if response.status_code != 200:
                    failures.append(response.text)
            bulk_seconds = time.perf_counter() - started
            visible = [visibility(http, replica.url, f"v-{i}", vectors) for i in range(probes)]
    finally:
        service.stop()
        replica.stop()
        shutil.rmtree(served.parent, ignore_errors=True)
        client = redis.Redis.from_url(SHARED_REDIS_URL)
        delete_prefix(client, prefix)
        catalogue_keys = client.keys(f"{{{prefix}:catalogue:*")
        if catalogue_keys:
            client.delete(*catalogue_keys)
        client.close()
    return {
        "single": {
            "writes": writes,
            "writers": writers,
            "writes_per_second": writes / single_seconds,
            "p50_ms": float(np.median(latencies)),
            "p99_ms": float(np.percentile(latencies, 99)),
        },
        "bulk": {
            "calls": bulks,
            "items_per_call": BULK,
            "items_per_second": bulks * BULK / bulk_seconds,
            "p50_ms": float(np.median(bulk_latencies)),
        },
        "visibility": {
            "probes": probes,
            "p50_s": float(np.median(visible)),
            "p99_s": float(np.percentile(visible, 99)),
            "max_s": float(max(visible)),
        },
        "failures": failures[:5],
    }


def visibility(http, other: str, item: str, vectors: dict) -> float:
    """Seconds from a PUT's acknowledgement by one replica until ``other`` serves it."""
    import httpx

    response = http.put(f"/items/{item}", json={"embeddings": vectors})
    response.raise_for_status()
    acknowledged = time.perf_counter()
    with httpx.Client(base_url=other, timeout=10) as probe:
        while probe.get(f"/items/{item}").status_code != 200:
            if time.perf_counter() - acknowledged > 30:
                raise TimeoutError(f"{item} not visible on {other} after 30 s")
            time.sleep(0.002)
    return time.perf_counter() - acknowledged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--bundle", default="perf-1m")
    parser.add_argument("--added", type=int, default=10_000)
    parser.add_argument("--withdrawn", type=int, default=1_000)
    parser.add_argument("--requests", type=int, default=300, help="per case and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--http", action="store_true", help="also time the write API")
    parser.add_argument(
        "--http-only", action="store_true", help="time the write API alone (with --http)"
    )
    parser.add_argument("--writes", type=int, default=2000)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--bulks", type=int, default=20)
    parser.add_argument("--probes", type=int, default=50)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    from service.bundle import load_bundle

    bundle = load_bundle(args.models_dir, args.bundle, device="cpu", threads=1)
    result = {
        "bundle": args.bundle,
        "items": bundle.catalogue.n_items,
        "added": args.added,
        "withdrawn": args.withdrawn,
    }
    if not args.http_only:
        added = added_records(bundle, args.added, args.seed)
        result["applying"] = applying(bundle, added)
        print(json.dumps(result["applying"]), flush=True)
        cases = {
            "bundle": {},
            "added": added,
            "added+withdrawn": {**added, **withdrawals(bundle, args.withdrawn)},
        }
        result["serving"] = serving(
            bundle, cases, requests=args.requests, rounds=args.rounds, seed=args.seed
        )
    if args.http:
        result["write_api"] = write_api(
            args.models_dir,
            bundle,
            writes=args.writes,
            writers=args.writers,
            bulks=args.bulks,
            probes=args.probes,
        )
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

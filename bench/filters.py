"""What a request filter costs /recommend: the serving path in process, filtered or not.

    .venv/bin/python -m bench.filters --models-dir models --bundle perf-1m \
        --requests 300 --rounds 3 --out docs/filters_bench.json

The bundle is loaded as ``bench.serving``'s in-process floor loads it (CPU, one-thread
ONNX sessions and native kernels, batches computed in one thread, no HTTP) and each
request is timed alone through ``service.recommender.Recommender``, for cache misses
(fresh random 20-event histories) and then hits (the same histories again: the
retrieval comes from the cache and the filter is applied after it), with k 10 and the
default 200 candidates. The cases:

- ``none``: no filter (the path every request took before filters existed);
- ``price-10%``, ``price-1%``: a price range keeping that share of the catalogue. Bundles
  carry no attributes yet, so the bench gives every item a seeded uniform price, in
  memory only; the filter is unrelated to the scores;
- ``categories-10%``, ``categories-1%``: seeded random categories (the bundle's genres)
  whose items add up to that share, when the catalogue has genres (the synthetic data
  writes them for catalogues of up to 100,000 items). Categories are the users' taste
  clusters, so these filters remove most of what retrieval ranks first.

Every round draws fresh histories and runs the cases in a rotated order (the machine is
shared and drifts); the summary is the median over rounds of each round's median.
``--subset-limit N`` replaces ``service.pipeline.SUBSET_LIMIT`` (filters keeping up to N
items are searched among their items, larger ones deeper in the index), to measure
either way for the same filter. Each
filter is compiled once before its case (what the first request with it pays is
reported as ``compile_ms``), as it is in a worker that serves it repeatedly. The JSON
also gives what travels to the compute process: the pickled filter, against the bytes of
a mask over the catalogue.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.serving import request_bodies  # noqa: E402

K = 10
HISTORY = 20
SHARES = {"10%": 0.10, "1%": 0.01}


def price_filters(catalogue, seed: int) -> dict:
    """A seeded uniform price in [0, 100) for every item, and ranges keeping each share."""
    from service.catalogue import ItemFilter

    rng = np.random.default_rng(seed)
    prices = rng.uniform(0, 100, catalogue.n_items + 1)
    prices[0] = np.nan
    catalogue.number_attributes["price"] = prices
    return {
        f"price-{name}": ItemFilter(ranges=(("price", 0.0, 100.0 * share),))
        for name, share in SHARES.items()
    }


def category_filters(catalogue, seed: int) -> dict:
    """Seeded random categories whose items add up to each share (none without genres)."""
    from service.catalogue import ItemFilter

    if not catalogue.categories:
        return {}
    names = sorted(catalogue.categories)
    order = np.random.default_rng(seed).permutation(len(names))
    filters = {}
    for label, share in SHARES.items():
        chosen, covered = [], 0
        for index in order:
            if covered >= share * catalogue.n_items or len(chosen) == 256:
                break
            chosen.append(names[index])
            covered += len(catalogue.categories[names[index]])
        filters[f"categories-{label}"] = ItemFilter(include_categories=tuple(chosen))
    return filters


def time_requests(recommender, bodies: list[str], item_filter) -> dict:
    """Milliseconds per request, misses then hits, and what the answers held."""
    from service.cache import InMemoryBehaviourCache

    async def run(cache, events) -> tuple[float, object]:
        started = time.perf_counter()
        answer = await recommender.recommend(events, k=K, cache=cache, item_filter=item_filter)
        return (time.perf_counter() - started) * 1000, answer

    async def measure() -> dict:
        cache = InMemoryBehaviourCache(history_cap=200, ttl_seconds=3600)
        histories = [
            [(e["item_id"], e["ts"]) for e in json.loads(body)["history"]] for body in bodies
        ]
        misses = [await run(cache, events) for events in histories]
        await recommender.drain()
        hits = [await run(cache, events) for events in histories]
        answers = [answer for _, answer in misses + hits]
        return {
            "miss_p50_ms": float(np.median([ms for ms, _ in misses])),
            "miss_p99_ms": float(np.percentile([ms for ms, _ in misses], 99)),
            "hit_p50_ms": float(np.median([ms for ms, _ in hits])),
            "hit_p99_ms": float(np.percentile([ms for ms, _ in hits], 99)),
            "hit_share": float(np.mean([a.cache == "hit" for _, a in hits])),
            "short_answers": int(sum(len(a.items) < K for a in answers)),
            "filtered_mean": float(np.mean([a.filtered for a in answers])),
        }

    return asyncio.run(measure())


def run(
    models_dir: Path,
    bundle_name: str,
    *,
    requests: int,
    rounds: int,
    seed: int,
    cases: list[str] | None = None,
) -> dict:
    """Every case (or those named in ``cases``) timed ``rounds`` times; see the module
    docstring."""
    from concurrent.futures import ThreadPoolExecutor

    from service.bundle import load_bundle
    from service.compute import ThreadCompute
    from service.devices import limit_native_threads
    from service.recommender import Recommender

    bundle = load_bundle(models_dir, bundle_name, device="cpu", threads=1)
    catalogue = bundle.catalogue
    filters = {
        "none": None,
        **price_filters(catalogue, seed),
        **category_filters(catalogue, seed),
    }
    filters = {name: f for name, f in filters.items() if cases is None or name in cases}
    described = {}
    for name, item_filter in filters.items():
        started = time.perf_counter()
        eligible = catalogue.eligible(item_filter)
        described[name] = {
            "compile_ms": (time.perf_counter() - started) * 1000,
            "share_kept": eligible.count / catalogue.n_items,
            "filter_bytes_pickled": len(pickle.dumps(item_filter, pickle.HIGHEST_PROTOCOL)),
            "mask_bytes": catalogue.n_items + 1,
        }
    executor = ThreadPoolExecutor(1, initializer=limit_native_threads, initargs=(1,))
    recommender = Recommender(bundle, compute=ThreadCompute(bundle, executor))
    names = list(filters)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    try:
        time_requests(
            recommender, request_bodies(catalogue.n_items, 20, HISTORY, k=K, seed=seed), None
        )
        for round_ in range(rounds):
            bodies = request_bodies(
                catalogue.n_items, requests, HISTORY, k=K, seed=seed + 1 + round_
            )
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                runs[name].append(time_requests(recommender, bodies, filters[name]))
                print(f"round {round_ + 1} {name}: {json.dumps(runs[name][-1])}", flush=True)
    finally:
        executor.shutdown()
    summary = {
        name: {
            **described[name],
            **{
                key: float(np.median([r[key] for r in results]))
                for key in ("miss_p50_ms", "miss_p99_ms", "hit_p50_ms", "hit_p99_ms")
            },
            "short_answers": sum(r["short_answers"] for r in results),
            "filtered_mean": float(np.mean([r["filtered_mean"] for r in results])),
        }
        for name, results in runs.items()
    }
    import service.pipeline

    return {
        "bundle": bundle_name,
        "items": catalogue.n_items,
        "subset_limit": service.pipeline.SUBSET_LIMIT,
        "index": bundle.retrievers[bundle.default_encoder].index.spec.factory,
        "requests_per_case_and_round": requests,
        "rounds": rounds,
        "summary": summary,
        "runs": runs,
    }


def table(result: dict) -> str:
    """The summary as a Markdown table."""
    lines = [
        "| case | share kept | compile ms | miss p50 / p99 ms | hit p50 / p99 ms | "
        "filtered (mean) | answers short of k |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in result["summary"].items():
        lines.append(
            f"| {name} | {row['share_kept']:.3f} | {row['compile_ms']:.2f} | "
            f"{row['miss_p50_ms']:.2f} / {row['miss_p99_ms']:.2f} | "
            f"{row['hit_p50_ms']:.2f} / {row['hit_p99_ms']:.2f} | "
            f"{row['filtered_mean']:.0f} | {row['short_answers']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--bundle", default="perf-1m")
    parser.add_argument("--requests", type=int, default=300, help="per case and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", nargs="+", help="only these cases (default: all)")
    parser.add_argument("--subset-limit", type=int, help="replace SUBSET_LIMIT for this run")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.subset_limit is not None:
        import service.pipeline

        service.pipeline.SUBSET_LIMIT = args.subset_limit
    result = run(
        args.models_dir,
        args.bundle,
        requests=args.requests,
        rounds=args.rounds,
        seed=args.seed,
        cases=args.cases,
    )
    print(table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

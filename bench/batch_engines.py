"""Throughput of batch-recommend's two engines, in process and on a local Ray, alternately.

    .venv/bin/python -m bench.batch_engines --models-dir models --bundle ml1m-short \
        --data ml-1m:../shared/data/ml-1m
    .venv/bin/python -m bench.batch_engines --models-dir models --bundle perf-1m \
        --data synthetic:users=250000,items=1000000,mean_length=20,max_length=60,zipf=0.6 \
        --users 20000

(from the repository root; the figures and their machine are in docs/BENCHMARKS.md, "Batch
recommendations: in process and on Ray"). The data are read once; the first ``--users``
users' histories (``--history all``) are written once as the Ray engine's Parquet input.
Then each round runs the in-process engine (``training.batch_recommend.batch_recommend``
after ``load_bundle``, as ``python -m training batch-recommend`` does) and the Ray engine
(``training.ray_engine.ray_batch_recommend``: its actors load the bundle, read the
histories and write the rows), one after the other, so that a change in the machine's load
reaches both. Users per second are users over each engine's wall time from the bundle on
disk to the rows written; the in-process engine's recommending loop alone is printed too.
Ray's start is timed once and left out of the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from service.bundle import load_bundle
from service.errors import RecserveError
from training.batch_recommend import batch_recommend, write_histories
from training.data import IdMap, SequenceData, build_sequences
from training.datasets import load_dataset
from training.errors import TrainingError


def first_users(data: SequenceData, n: int | None) -> SequenceData:
    """The data of the first ``n`` users (all of them for None)."""
    if n is None or n >= data.n_users:
        return data
    end = int(data.offsets[n])
    return replace(
        data,
        user_map=IdMap(raw=data.user_map.raw[: n + 1]),
        offsets=data.offsets[: n + 1],
        items=data.items[:end],
        timestamps=data.timestamps[:end],
        ratings=None if data.ratings is None else data.ratings[:end],
    )


def run_inprocess(models_dir: Path, bundle: str, data: SequenceData, out: Path, args) -> dict:
    started = time.perf_counter()
    loaded = load_bundle(models_dir, bundle, device="cpu")
    stats = batch_recommend(loaded, data, out, k=args.k, batch_size=args.batch_size)
    wall = time.perf_counter() - started
    return {"wall_s": wall, "users_per_s": stats["users"] / wall, "loop_users_per_s":
            stats["users_per_second"], "rows": stats["rows"]}  # fmt: skip


def run_ray(models_dir: Path, bundle: str, histories: Path, out: Path, args) -> dict:
    from training.ray_engine import ray_batch_recommend

    started = time.perf_counter()
    stats = ray_batch_recommend(
        models_dir,
        histories,
        out,
        bundle=bundle,
        k=args.k,
        batch_size=args.batch_size,
        device="cpu",
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
    )
    wall = time.perf_counter() - started
    return {"wall_s": wall, "users_per_s": stats["users"] / wall, "rows": stats["rows"],
            "actors": stats["actors"]}  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.batch_engines",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--data", required=True, help="the data spec the bundle was built on")
    parser.add_argument("--users", type=int, help="only the first N users (default: all)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--ray-cpus", type=int, default=os.cpu_count(), help="local Ray's CPUs")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--cpus-per-actor", type=float, default=0.5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import ray

    try:
        data = first_users(build_sequences(load_dataset(args.data)), args.users)
        with tempfile.TemporaryDirectory(prefix="batch-engines-") as tmp:
            tmp = Path(tmp)
            histories = tmp / "histories"
            write_histories(data, histories, rows_per_file=max(1, data.n_users // 8))
            started = time.perf_counter()
            ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
            ray_start = time.perf_counter() - started
            print(f"{data.n_users} users; local Ray with {args.ray_cpus} CPUs up in "
                  f"{ray_start:.1f}s")  # fmt: skip
            rounds = []
            for number in range(args.rounds):
                inprocess = run_inprocess(
                    args.models_dir, args.bundle, data, tmp / f"in-{number}.parquet", args
                )
                on_ray = run_ray(args.models_dir, args.bundle, histories, tmp / f"ray-{number}",
                                 args)  # fmt: skip
                if inprocess["rows"] != on_ray["rows"]:
                    raise TrainingError(
                        f"the engines wrote {inprocess['rows']} and {on_ray['rows']} rows"
                    )
                rounds.append({"inprocess": inprocess, "ray": on_ray})
                print(
                    f"round {number + 1}: in process {inprocess['users_per_s']:.0f} users/s "
                    f"({inprocess['wall_s']:.1f}s; loop alone {inprocess['loop_users_per_s']:.0f}"
                    f" users/s), Ray {on_ray['users_per_s']:.0f} users/s ({on_ray['wall_s']:.1f}s,"
                    f" {on_ray['actors']} actors)",
                    flush=True,
                )
            ray.shutdown()
    except (TrainingError, RecserveError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {
        "bundle": args.bundle,
        "users": data.n_users,
        "ray_start_s": ray_start,
        "actors": args.actors,
        "cpus_per_actor": args.cpus_per_actor,
        "median_users_per_s": {
            engine: statistics.median(r[engine]["users_per_s"] for r in rounds)
            for engine in ("inprocess", "ray")
        },
        "median_loop_users_per_s_inprocess": statistics.median(
            r["inprocess"]["loop_users_per_s"] for r in rounds
        ),
        "rounds": rounds,
    }
    medians = summary["median_users_per_s"]
    print(
        f"median users/s: in process {medians['inprocess']:.0f}, Ray {medians['ray']:.0f} "
        f"(in-process loop alone {summary['median_loop_users_per_s_inprocess']:.0f})"
    )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

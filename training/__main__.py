"""Command line of the training package.

python -m training quickstart --data synthetic --out runs/quickstart --models-dir models
python -m training generate --out data/synthetic.parquet [--users 5000 --items 2000]
python -m training train --data synthetic --model sasrec --out runs/default
python -m training train --data ml-1m:../shared/data/ml-1m --max-len 200 --out runs/ml1m
python -m training export --data synthetic --checkpoint runs/default/checkpoint.pt \
    --ctr-head adam [--rerank-default auto|on|off]
python -m training evaluate --checkpoint runs/default/checkpoint.pt --data synthetic

Progress bars are drawn only on a terminal; training reports one line per epoch either
way, and ``-v`` adds every INFO log line. ``quickstart`` is quiet without ``-v``: library
warnings and whatever else libraries write go to ``quickstart.log`` in its run folder.

A problem with the data, a checkpoint, a setting or a bundle is reported as one line,
``error: ...``, with exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from service.bundle import load_bundle
from service.errors import RecserveError
from service.settings import Settings
from training.cli_options import (
    add_bundle_flags,
    add_data_flags,
    add_model_flags,
    add_training_flags,
    index_options,
    train_config,
)
from training.console import configure_logging, output_to_file, text_table
from training.ctr import CtrConfig
from training.data import SequenceData, build_sequences
from training.datasets import load_dataset
from training.errors import ConfigError, TrainingError
from training.evaluate import evaluate, model_scorer, popularity_scorer
from training.export import DEFAULT_COLD_START, export_bundle
from training.optimizers import OPTIMIZERS
from training.quickstart import QuickstartConfig, run_quickstart, summary_table
from training.rerank_gate import RERANK_DEFAULTS, GateConfig
from training.synthetic import SyntheticConfig, generate
from training.trainer import check_same_items, load_checkpoint, train

# The histories batch-recommend can recommend from (training.batch_recommend.history_ranges).
HISTORIES = ["all", "test", "valid"]


def _service_default(setting: str):
    """The service's default of a setting (``service.settings.Settings``), so that what
    ``batch-recommend --warm-cache`` writes is where the service looks by default."""
    return Settings.model_fields[setting].default


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    quickstart = commands.add_parser(
        "quickstart",
        help="train every retriever kind, export one bundle with CTR heads, print one table",
    )
    add_data_flags(quickstart, default="synthetic")
    quickstart.add_argument(
        "--out", type=Path, default=Path("runs/quickstart"), help="run folder (and its log)"
    )
    add_bundle_flags(quickstart, "--models-dir")
    quickstart.add_argument(
        "--models", nargs="+", help="train only these retrievers (default: every recipe's)"
    )
    quickstart.add_argument(
        "--epochs", type=int, default=0, help="epochs of every retriever (0: the recipes')"
    )
    quickstart.add_argument(
        "--head-epochs", type=int, default=0, help="epochs of every CTR head (0: the recipe's)"
    )
    quickstart.add_argument(
        "--budget",
        type=float,
        default=QuickstartConfig.budget_seconds,
        help="seconds of training for all retrievers together",
    )
    add_training_flags(quickstart, "--threads")
    quickstart.set_defaults(threads=QuickstartConfig.threads)

    generate = commands.add_parser("generate", help="write the synthetic default data to a file")
    generate.add_argument("--out", required=True, type=Path, help=".parquet or .csv")
    generate.add_argument("--users", type=int, default=5000)
    generate.add_argument("--items", type=int, default=2000)
    generate.add_argument("--seed", type=int, default=0)

    train = commands.add_parser("train", help="train and evaluate an encoder")
    add_data_flags(train)
    train.add_argument("--out", required=True, type=Path, help="run folder")
    add_model_flags(train)
    add_training_flags(train)

    export = commands.add_parser("export", help="export checkpoints into a model bundle")
    add_data_flags(export)
    export.add_argument(
        "--checkpoint",
        required=True,
        action="append",
        type=Path,
        help="a trained checkpoint (repeat for several encoders)",
    )
    export.add_argument("--name", help="bundle name (default: bundle-<UTC time>)")
    add_bundle_flags(export)
    export.add_argument("--no-current", action="store_true", help="do not update CURRENT")
    export.add_argument(
        "--no-metadata-encoder",
        action="store_true",
        help="fit no item-metadata encoder (cold start), even where the data has metadata",
    )
    export.add_argument(
        "--ctr-head",
        choices=list(OPTIMIZERS),
        help="also train a CTR head per retriever, with this optimiser",
    )
    export.add_argument(
        "--rerank-default",
        choices=list(RERANK_DEFAULTS),
        default="auto",
        help="whether a CTR head reranks requests that do not say: auto (the gate: only "
        "where it raises NDCG@10 on held-out validation users beyond a bootstrap interval), "
        "on, or off (the gate's measurement is recorded either way)",
    )

    recommend = commands.add_parser(
        "batch-recommend", help="top-K for every user through a bundle, to Parquet"
    )
    add_data_flags(recommend, required=False)
    add_bundle_flags(recommend, "--models-dir")
    recommend.add_argument("--bundle", help="bundle name (default: the one in CURRENT)")
    recommend.add_argument("--encoder", help="retriever to use (default: the bundle's)")
    recommend.add_argument(
        "--out",
        required=True,
        type=Path,
        help=".parquet file (inprocess engine) or new folder of Parquet partitions (ray)",
    )
    recommend.add_argument("-k", type=int, default=10)
    recommend.add_argument("--batch-size", type=int, default=512, help="users per batch")
    recommend.add_argument(
        "--history",
        choices=HISTORIES,
        help="all events (recommend what comes next, the default) or the evaluation's "
        "history; the ray engine's histories are chosen when they are written",
    )
    recommend.add_argument(
        "--engine",
        default="inprocess",
        choices=["inprocess", "ray"],
        help="inprocess (reads --data) or ray: Ray Data actors over --histories (the ray extra)",
    )
    recommend.add_argument(
        "--histories",
        type=Path,
        help="ray engine: folder of Parquet histories (python -m training histories)",
    )
    recommend.add_argument(
        "--ray-address",
        help="ray engine: the cluster (HOST:PORT, auto, ray://...; default: RAY_ADDRESS, "
        "else a new local Ray)",
    )
    recommend.add_argument(
        "--ray-actors",
        type=int,
        help="ray engine: actors, each loading the bundle once (default: as many as fit "
        "beside one free CPU)",
    )
    recommend.add_argument(
        "--ray-cpus-per-actor", type=float, default=1.0, help="ray engine: CPUs per actor"
    )
    recommend.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    recommend.add_argument(
        "--warm-cache",
        action="store_true",
        help="also load histories and retrievals into the service's Redis cache",
    )
    recommend.add_argument(
        "--catalogue",
        action="store_true",
        help="serve the catalogue API's writes read from Redis (withdrawn items left out, "
        "added items retrieved), as the service does",
    )
    recommend.add_argument(
        "--cold-start-exposure",
        type=float,
        default=_service_default("cold_start_exposure"),
        help="as RECSERVE_COLD_START_EXPOSURE",
    )
    recommend.add_argument(
        "--deployment",
        help="as RECSERVE_DEPLOYMENT (default: derived from --models-dir, as the service does)",
    )
    recommend.add_argument(
        "--redis-url", default=_service_default("redis_url"), help="as RECSERVE_REDIS_URL"
    )
    recommend.add_argument(
        "--key-prefix", default=_service_default("key_prefix"), help="as RECSERVE_KEY_PREFIX"
    )
    for flag, setting in (("--history-cap", "history_cap"), ("--candidates", "candidates")):
        recommend.add_argument(
            flag, type=int, default=_service_default(setting), help="as the service's"
        )
    recommend.add_argument(
        "--cache-ttl", type=int, default=_service_default("cache_ttl_seconds"), help="seconds"
    )

    histories = commands.add_parser(
        "histories",
        help="write every user's history as Parquet partitions (batch-recommend --engine "
        "ray reads them)",
    )
    add_data_flags(histories)
    histories.add_argument("--out", required=True, type=Path, help="a new or empty folder")
    histories.add_argument(
        "--history",
        default="all",
        choices=HISTORIES,
        help="as batch-recommend's: all events, or the evaluation's history",
    )
    histories.add_argument("--rows-per-file", type=int, default=100_000, help="users per file")

    evaluate = commands.add_parser("evaluate", help="evaluate a checkpoint on a dataset")
    add_data_flags(evaluate)
    evaluate.add_argument("--checkpoint", required=True, type=Path)
    evaluate.add_argument("--split", default="test", choices=["valid", "test"])
    return parser


def _metrics_table(metrics: dict) -> str:
    names = ["recall@10", "recall@20", "ndcg@10", "ndcg@20", "mrr"]
    rows = [
        [model, split, *(values[n] for n in names)]
        for model, splits in metrics.items()
        for split, values in splits.items()
    ]
    return text_table(["", "split", *names], rows)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(verbose=args.verbose)
    try:
        if args.command == "quickstart":
            return _quickstart(args)
        if args.command == "generate":
            return _generate(args)
        if args.command == "train":
            return _train(args)
        if args.command == "export":
            return _export(args)
        if args.command == "batch-recommend":
            return _batch_recommend(args)
        if args.command == "histories":
            return _histories(args)
        return _evaluate(args)
    except (TrainingError, RecserveError) as exc:
        # One line naming the problem, never a traceback (some messages quote a library's
        # paragraph: its lines are joined).
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"error: {message}", file=sys.stderr)
        return 2


def _sequences(args) -> SequenceData:
    return build_sequences(load_dataset(args.data, args.skip_malformed))


def _quickstart(args) -> int:
    config = QuickstartConfig(budget_seconds=args.budget, threads=args.threads)
    config = config.with_limits(
        epochs=args.epochs, head_epochs=args.head_epochs, models=args.models
    )
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "quickstart.log"
    log.unlink(missing_ok=True)
    with output_to_file(log, enabled=not args.verbose) as console:
        configure_logging(verbose=args.verbose, log_file=log, console_warnings=args.verbose)
        result = run_quickstart(_sequences(args), args.out, args.models_dir, config)
        data = result.manifest["dataset"]
        print(
            f"\ntest metrics of {data['eval_users']} users over {data['items']} items, and "
            "NDCG@10 in retrieval order vs reranked by each retriever's CTR head "
            f"(up to {config.ctr.candidates} candidates):",
            file=console,
        )
        print(summary_table(result), file=console)
        steps = ", ".join(f"{step} {seconds:.0f}s" for step, seconds in result.seconds.items())
        print(f"\ntime: {steps}", file=console)
        if result.skipped:
            print(f"left out for time: {', '.join(result.skipped)}", file=console)
        print(f"bundle: {result.bundle} (now CURRENT)", file=console)
        print(f"run folder: {args.out} (log: {log})", file=console)
    return 0


def _generate(args) -> int:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    log = generate(SyntheticConfig(users=args.users, items=args.items, seed=args.seed))
    table = pa.table(
        {"user": log.users.astype(str), "item": log.items.astype(str), "timestamp": log.timestamps}
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.suffix == ".csv":
        pacsv.write_csv(table, args.out)
    else:
        pq.write_table(table, args.out)
    print(f"wrote {len(log)} interactions to {args.out}")
    return 0


def _train(args) -> int:
    config = train_config(args)  # before the data: a typo in an option should fail fast
    interactions = load_dataset(args.data, args.skip_malformed)
    if interactions.skipped:
        print(f"skipped {interactions.skipped} malformed lines in {interactions.source}")
    data = build_sequences(interactions)
    result = train(data, config, args.out)
    report = result.report
    print(f"data: {json.dumps(report['data'])}")
    print(
        f"trained {report['epochs_run']} epochs in {report['train_seconds']:.1f}s, "
        f"best epoch {report['best_epoch']}"
    )
    print(_metrics_table(report["metrics"]))
    test = report["metrics"]
    ratio = test["model"]["test"]["ndcg@10"] / max(test["popularity"]["test"]["ndcg@10"], 1e-12)
    print(f"test NDCG@10 model / popularity: {ratio:.2f}x")
    print(f"run folder: {args.out} (checkpoint.pt, report.json, training_curve.png)")
    return 0


def _export(args) -> int:
    path = export_bundle(
        args.checkpoint,
        _sequences(args),
        args.models_dir,
        name=args.name,
        index=args.index,
        index_options=index_options(args),
        index_device=args.index_device,
        make_current=not args.no_current,
        ctr=CtrConfig(optimizer=args.ctr_head) if args.ctr_head else None,
        cold_start=None if args.no_metadata_encoder else DEFAULT_COLD_START,
        gate=GateConfig(rerank_default=args.rerank_default),
    )
    print(f"bundle written: {path}")
    return 0


def _check_engine_flags(args) -> None:
    """Each engine's input and the flags only one of them takes."""
    if args.engine == "inprocess":
        if args.data is None:
            raise ConfigError("batch-recommend needs --data (or --engine ray --histories DIR)")
        ray_only = ["--histories", "--ray-address", "--ray-actors"]
        given = [flag for flag in ray_only if getattr(args, flag[2:].replace("-", "_"))]
        if given:
            raise ConfigError(f"{', '.join(given)}: only with --engine ray")
        return
    refused = {
        "--data": "the ray engine reads --histories (python -m training histories --data ...)",
        "--history": "choose the histories when writing them (python -m training histories "
        "--history ...)",
        "--warm-cache": "the ray engine writes no cache; warm it with the inprocess engine",
    }
    for flag, why in refused.items():
        if getattr(args, flag[2:].replace("-", "_")):
            raise ConfigError(f"{flag} is not taken by --engine ray: {why}")
    if args.histories is None:
        raise ConfigError("--engine ray needs --histories DIR (python -m training histories)")


def _batch_recommend(args) -> int:
    _check_engine_flags(args)
    if args.engine == "ray":
        return _ray_batch_recommend(args)
    # Only this command needs the serving side's recommender and Redis client.
    from training.batch_recommend import batch_recommend

    bundle = load_bundle(args.models_dir, args.bundle, device=args.device)
    if args.encoder and args.encoder not in bundle.retrievers:
        raise ConfigError(
            f"bundle {bundle.name} has no encoder {args.encoder!r} "
            f"(it has {', '.join(bundle.retrievers)})"
        )
    data = _sequences(args)
    served = asyncio.run(_served_catalogue(args, bundle)) if args.catalogue else None
    stats = batch_recommend(
        bundle,
        data,
        args.out,
        encoder=args.encoder,
        k=args.k,
        history=args.history or "all",
        batch_size=args.batch_size,
        served=served,
    )
    _print_stats(stats, args.out)
    if args.warm_cache:
        from service.cache import RedisBehaviourCache
        from training.batch_recommend import warm_cache

        async def warm() -> dict:
            cache = RedisBehaviourCache(
                args.redis_url, args.key_prefix, args.history_cap, args.cache_ttl, timeout=5.0
            )
            try:
                return await warm_cache(
                    cache, bundle, data, encoder=args.encoder, candidates=args.candidates
                )
            finally:
                await cache.close()

        warmed = asyncio.run(warm())
        print(f"warmed the cache at {args.redis_url} for {warmed['users_warmed']} users")
    return 0


def _print_stats(stats: dict, out: Path) -> None:
    print(
        f"{stats['users']} users, {stats['rows']} rows in {stats['seconds']:.1f}s "
        f"({stats['users_per_second']:.0f} users/s) with {stats['encoder']} of "
        f"{stats['bundle']} at catalogue version {stats['catalogue_version']} -> {out}"
    )


def _ray_batch_recommend(args) -> int:
    from training.ray_engine import ray_batch_recommend

    catalogue = asyncio.run(_catalogue_records(args)) if args.catalogue else None
    stats = ray_batch_recommend(
        args.models_dir,
        args.histories,
        args.out,
        bundle=args.bundle,
        encoder=args.encoder,
        k=args.k,
        batch_size=args.batch_size,
        device=args.device,
        actors=args.ray_actors,
        cpus_per_actor=args.ray_cpus_per_actor,
        address=args.ray_address,
        catalogue=catalogue,
        exposure=args.cold_start_exposure,
    )
    _print_stats(stats, args.out)
    print(f"on Ray with {stats['actors']} actors")
    return 0


def _histories(args) -> int:
    from training.batch_recommend import write_histories

    counts = write_histories(
        _sequences(args), args.out, history=args.history, rows_per_file=args.rows_per_file
    )
    print(
        f"wrote the histories of {counts['users']} users ({counts['events']} events) in "
        f"{counts['files']} files to {args.out}"
    )
    return 0


async def _served_catalogue(args, bundle):
    """The catalogue the service serves: the bundle with the catalogue API's writes."""
    from service.live_catalogue import ServedCatalogue

    version, records = await _catalogue_records(args)
    return ServedCatalogue.of_records(
        bundle, version, records, embed=True, exposure=args.cold_start_exposure
    )


async def _catalogue_records(args) -> tuple:
    """(version, records) of the catalogue API's writes, read from the deployment's Redis."""
    from service.cache import connect_redis
    from service.catalogue_store import CatalogueStore
    from service.errors import StoreUnavailable
    from service.reload_signals import deployment_of

    client = connect_redis(args.redis_url, timeout=5)
    store = CatalogueStore(client, args.key_prefix, deployment_of(args.models_dir, args.deployment))
    try:
        version, records = await store.changes_since(0)
    except StoreUnavailable as exc:
        raise ConfigError(f"--catalogue: {exc} (at {args.redis_url})") from exc
    finally:
        await client.aclose()
    return version, records


def _evaluate(args) -> int:
    model, payload = load_checkpoint(args.checkpoint)
    data = _sequences(args)
    check_same_items(args.checkpoint, payload, data)
    metrics = {
        "model": {args.split: evaluate(model_scorer(model), data, args.split, model.max_len)},
        "popularity": {
            args.split: evaluate(popularity_scorer(data), data, args.split, model.max_len)
        },
    }
    print(_metrics_table(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())

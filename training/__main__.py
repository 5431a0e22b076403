"""Command line of the training package.

python -m training generate --out data/synthetic.parquet [--users 5000 --items 2000]
python -m training train --data synthetic --model sasrec --out runs/default
python -m training train --data ml-1m:../shared/data/ml-1m --max-len 200 --out runs/ml1m
python -m training evaluate --checkpoint runs/default/checkpoint.pt --data synthetic
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from service.errors import RecserveError
from training.data import build_sequences
from training.datasets import load_dataset
from training.errors import ConfigError, TrainingError


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        required=True,
        help="KIND:PATH with KIND in ml-1m, ml-100k, amazon, csv, parquet; or synthetic[:k=v,...]",
    )
    parser.add_argument(
        "--skip-malformed",
        action="store_true",
        help="skip malformed lines (their count is reported) instead of failing",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="write the synthetic default data to a file")
    generate.add_argument("--out", required=True, type=Path, help=".parquet or .csv")
    generate.add_argument("--users", type=int, default=5000)
    generate.add_argument("--items", type=int, default=2000)
    generate.add_argument("--seed", type=int, default=0)

    train = commands.add_parser("train", help="train and evaluate an encoder")
    _add_data_args(train)
    train.add_argument("--out", required=True, type=Path, help="run folder")
    train.add_argument("--model", default="sasrec")
    train.add_argument("--loss", default="full_softmax")
    train.add_argument("--epochs", type=int, default=20)
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--patience", type=int, default=5)
    train.add_argument("--eval-every", type=int, default=1)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="cpu")
    train.add_argument("--threads", type=int, default=0)
    train.add_argument("--max-len", type=int, default=50)
    train.add_argument("--dim", type=int, default=64)
    # None: the model's own default; only SASRec has layers and heads.
    train.add_argument("--layers", type=int, default=None, help="sasrec: blocks (default 2)")
    train.add_argument("--heads", type=int, default=None, help="sasrec: heads (default 2)")
    train.add_argument("--dropout", type=float, default=0.2)
    train.add_argument("--no-time", action="store_true", help="ignore time intervals")
    train.add_argument(
        "--model-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the model's config, e.g. --model-option n_stacks=3 (repeatable)",
    )
    train.add_argument(
        "--loss-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the loss, e.g. --loss-option temperature=0.1 (repeatable)",
    )

    export = commands.add_parser("export", help="export checkpoints into a model bundle")
    _add_data_args(export)
    export.add_argument(
        "--checkpoint",
        required=True,
        action="append",
        type=Path,
        help="a trained checkpoint (repeat for several encoders)",
    )
    export.add_argument("--models-dir", type=Path, default=Path("models"))
    export.add_argument("--name", help="bundle name (default: bundle-<UTC time>)")
    export.add_argument(
        "--index",
        default="auto",
        help="auto, or a faiss factory string such as Flat, OPQ16,IVF1024,PQ16x8, HNSW32",
    )
    export.add_argument(
        "--index-device",
        default="auto",
        choices=["auto", "cpu", "gpu"],
        help="where the service will search the index; auto: a GPU if faiss sees one here",
    )
    export.add_argument("--nprobe", type=int, default=None, help="IVF lists visited per query")
    export.add_argument("--rescore", type=int, default=None, help="shortlist re-scored exactly")
    export.add_argument("--no-current", action="store_true", help="do not update CURRENT")
    export.add_argument(
        "--ctr-head",
        choices=["adam", "adatask"],
        help="also train a CTR head per retriever, with this optimiser",
    )

    recommend = commands.add_parser(
        "batch-recommend", help="top-K for every user through a bundle, to Parquet"
    )
    _add_data_args(recommend)
    recommend.add_argument("--models-dir", type=Path, default=Path("models"))
    recommend.add_argument("--bundle", help="bundle name (default: the one in CURRENT)")
    recommend.add_argument("--encoder", help="retriever to use (default: the bundle's)")
    recommend.add_argument("--out", required=True, type=Path, help=".parquet")
    recommend.add_argument("-k", type=int, default=10)
    recommend.add_argument(
        "--history",
        default="all",
        choices=["all", "test", "valid"],
        help="all events (recommend what comes next) or the evaluation's history",
    )
    recommend.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    recommend.add_argument(
        "--warm-cache",
        action="store_true",
        help="also load histories and retrievals into the service's Redis cache",
    )
    recommend.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    recommend.add_argument("--key-prefix", default="recserve", help="as RECSERVE_KEY_PREFIX")
    recommend.add_argument("--history-cap", type=int, default=200, help="as the service's")
    recommend.add_argument("--candidates", type=int, default=200, help="as the service's")
    recommend.add_argument("--cache-ttl", type=int, default=3600, help="seconds")

    evaluate = commands.add_parser("evaluate", help="evaluate a checkpoint on a dataset")
    _add_data_args(evaluate)
    evaluate.add_argument("--checkpoint", required=True, type=Path)
    evaluate.add_argument("--split", default="test", choices=["valid", "test"])
    return parser


def _metrics_table(metrics: dict) -> str:
    names = ["recall@10", "recall@20", "ndcg@10", "ndcg@20", "mrr"]
    lines = [f"{'':12}{'split':>7}" + "".join(f"{n:>11}" for n in names)]
    for model, splits in metrics.items():
        for split, values in splits.items():
            lines.append(f"{model:12}{split:>7}" + "".join(f"{values[n]:>11.4f}" for n in names))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "train":
            return _train(args)
        if args.command == "export":
            return _export(args)
        if args.command == "batch-recommend":
            return _batch_recommend(args)
        return _evaluate(args)
    except (TrainingError, RecserveError) as exc:
        # One line naming the problem, never a traceback (some messages quote a library's
        # paragraph: its lines are joined).
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"error: {message}", file=sys.stderr)
        return 2


def _generate(args) -> int:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from training.synthetic import SyntheticConfig, generate

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


def _key_values(pairs: list[str], flag: str) -> dict:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}`` with numbers and booleans parsed."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} expects KEY=VALUE, got {pair!r}")
        options[key.strip()] = json.loads(value) if _is_json_scalar(value) else value
    return options


def _is_json_scalar(text: str) -> bool:
    try:
        return isinstance(json.loads(text), (int, float, bool))
    except ValueError:
        return False


def _model_options(args) -> dict:
    """The model options from the flags; one the chosen model does not have is an error."""
    from training.models import encoder_options

    options = {
        "max_len": args.max_len,
        "dim": args.dim,
        "dropout": args.dropout,
        "use_time": not args.no_time,
    }
    for key, value in (("n_layers", args.layers), ("n_heads", args.heads)):
        if value is not None:
            options[key] = value
    options.update(_key_values(args.model_option, "--model-option"))
    unknown = set(options) - encoder_options(args.model)
    if unknown:
        raise ConfigError(f"--model {args.model} has no option(s) {', '.join(sorted(unknown))}")
    return options


def _train(args) -> int:
    from training.trainer import TrainConfig, train

    model_options = _model_options(args)  # before the data: a typo should fail fast
    interactions = load_dataset(args.data, args.skip_malformed)
    if interactions.skipped:
        print(f"skipped {interactions.skipped} malformed lines in {interactions.source}")
    data = build_sequences(interactions)
    config = TrainConfig(
        model=args.model,
        loss=args.loss,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        patience=args.patience,
        eval_every=args.eval_every,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        model_options=model_options,
        loss_options=_key_values(args.loss_option, "--loss-option"),
    )
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
    from training.ctr import CtrConfig
    from training.export import export_bundle

    data = build_sequences(load_dataset(args.data, args.skip_malformed))
    overrides = {
        key: value
        for key, value in (("nprobe", args.nprobe), ("rescore", args.rescore))
        if value is not None
    }
    path = export_bundle(
        args.checkpoint,
        data,
        args.models_dir,
        name=args.name,
        index=args.index,
        index_options=overrides,
        index_device=args.index_device,
        make_current=not args.no_current,
        ctr=CtrConfig(optimizer=args.ctr_head) if args.ctr_head else None,
    )
    print(f"bundle written: {path}")
    return 0


def _batch_recommend(args) -> int:
    from service.bundle import load_bundle
    from training.batch_recommend import batch_recommend

    bundle = load_bundle(args.models_dir, args.bundle, device=args.device)
    if args.encoder and args.encoder not in bundle.retrievers:
        print(
            f"error: bundle {bundle.name} has no encoder {args.encoder!r} "
            f"(it has {', '.join(bundle.retrievers)})",
            file=sys.stderr,
        )
        return 2
    data = build_sequences(load_dataset(args.data, args.skip_malformed))
    stats = batch_recommend(bundle, data, args.out, args.encoder, args.k, args.history)
    print(
        f"{stats['users']} users, {stats['rows']} rows in {stats['seconds']:.1f}s "
        f"({stats['users_per_second']:.0f} users/s) with {stats['encoder']} of "
        f"{stats['bundle']} -> {args.out}"
    )
    if args.warm_cache:
        import asyncio

        from service.cache import RedisBehaviourCache
        from training.batch_recommend import warm_cache

        async def warm() -> dict:
            cache = RedisBehaviourCache(
                args.redis_url, args.key_prefix, args.history_cap, args.cache_ttl, timeout=5.0
            )
            try:
                return await warm_cache(cache, bundle, data, args.encoder, args.candidates)
            finally:
                await cache.close()

        warmed = asyncio.run(warm())
        print(f"warmed the cache at {args.redis_url} for {warmed['users_warmed']} users")
    return 0


def _evaluate(args) -> int:
    from training.evaluate import evaluate, model_scorer, popularity_scorer
    from training.trainer import check_same_items, load_checkpoint

    model, payload = load_checkpoint(args.checkpoint)
    data = build_sequences(load_dataset(args.data, args.skip_malformed))
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

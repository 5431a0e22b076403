"""Build a perf-only bundle over a synthetic catalogue of 1,000,000 items.

    .venv/bin/python -m bench.make_perf_bundle --models-dir models --name perf-1m

(from the repository root; its run times are in docs/BENCHMARKS.md, "The perf bundle"). It

1. generates a synthetic log (``training.synthetic``) of 250,000 users with short histories
   over 1,000,000 items; the catalogue is all generated items, so the few never drawn
   stay in it as cold items, as in a real catalogue;
2. trains a two-tower encoder (one shared item table) for one epoch with ``sampled_softmax``
   (a full softmax over a million items per position is out of reach on a CPU); the
   trainer's full-ranking evaluation scores every item for each evaluated user, so it
   runs on a seeded sample of users (``--eval-users``) instead of all of them;
3. exports it with ``training.export.export_bundle(..., perf_only=True)`` and the index
   ``IndexSpec.auto`` picks for a million items (IVF with fast-scan PQ codes, partitioned
   in the MIPS->L2 space, re-scored exactly), with a CTR head trained on the candidates
   retrieved for a sample of ``--ctr-users`` users (so the serving benchmark includes
   the rerank stage), whose recall@10/@100 against exact search, bytes per vector,
   compression and query latency the manifest records;
4. writes the held-out user embeddings the recall was measured on to
   ``<run-dir>/heldout_queries.npy`` for ``bench/index.py``, and prints a summary.

The bundle is marked ``perf_only`` in its manifest (its encoder is trained for minutes:
it exists to measure the serving path, not to recommend) and does not become CURRENT
unless ``--make-current`` is given. ``--replace`` rebuilds an existing perf-only bundle.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from service.bundle import CURRENT, MANIFEST, bundle_dir, read_manifest
from service.encoder import OnnxUserEncoder
from service.errors import BundleError, RecserveError
from training.cli_options import (
    add_bundle_flags,
    add_model_flags,
    add_training_flags,
    index_options,
)
from training.ctr import CtrConfig
from training.data import IdMap, SequenceData, build_sequences
from training.errors import TrainingError
from training.export import export_bundle, heldout_user_embeddings
from training.synthetic import SyntheticConfig, generate
from training.trainer import TrainConfig, train, training_windows

LOG = logging.getLogger("bench.make_perf_bundle")


@dataclass
class PerfBundleConfig:
    """Data, training and index settings of the perf bundle; defaults make the 1M bundle."""

    items: int = 1_000_000
    users: int = 250_000
    mean_length: float = 20.0
    max_length: int = 60  # longest generated history; keeps the generator's arrays small
    zipf: float = 0.6  # flatter than the default 1.0, so that most of the million items are seen
    seed: int = 0
    model: str = "two_tower"
    dim: int = 64
    max_len: int = 50
    batch_size: int = 2048  # a step costs about the same at 256 or 2048 (see train_encoder)
    lr: float = 5e-3
    epochs: int = 1
    eval_users: int = 1000  # users in each full-ranking evaluation (valid, test)
    index: str = "auto"
    index_options: dict = field(default_factory=dict)
    index_device: str = "auto"  # where the index will be searched (decides auto's kind)
    train_device: str = "cpu"  # torch device of the training run, e.g. cuda
    threads: int = 0  # torch threads; 0: torch's default
    ctr_users: int = 2000  # users whose retrieved candidates train the CTR head (0: no head)
    ctr_epochs: int = 5

    def model_options(self) -> dict:
        options = {"max_len": self.max_len, "dim": self.dim}
        if self.model == "two_tower":
            # One table instead of two: each step's optimizer update touches every row of
            # every item table, which dominates a step with a million items.
            options["separate_history"] = False
        return options


@dataclass
class SampledEvaluationData(SequenceData):
    """SequenceData whose evaluation runs on a seeded sample of the eligible users.

    Training and the leave-last-out split are unchanged (every user with three or more
    events still holds out its last two); only ``eval_users`` -- and so the trainer's
    full-ranking evaluation, the report and the export's held-out queries -- is cut down,
    because full ranking scores all N items for each evaluated user.
    """

    eval_sample: int = 1000
    eval_seed: int = 0

    def eval_users(self) -> np.ndarray:
        users = super().eval_users()
        if len(users) <= self.eval_sample:
            return users
        rng = np.random.default_rng(self.eval_seed)
        return np.sort(rng.choice(users, self.eval_sample, replace=False))


def with_full_catalogue(data: SequenceData, n_items: int) -> SequenceData:
    """The same events over all generated items 1..n_items, never-drawn (cold) ones included.

    The generator's raw item ids are the integers 1..n_items and ``IdMap.fit`` numbers the
    seen ones in numeric order, so over the full catalogue internal id == raw id.
    """
    raw = np.concatenate([np.array([""]), np.arange(1, n_items + 1).astype(str)])
    seen_raw = np.concatenate([[0], data.item_map.raw[1:].astype(np.int64)])  # old id -> raw
    return SequenceData(
        user_map=data.user_map,
        item_map=IdMap(raw=raw),
        offsets=data.offsets,
        items=seen_raw[data.items],
        timestamps=data.timestamps,
        ratings=data.ratings,
        source=data.source,
        metadata=data.metadata,
    )


def build_data(config: PerfBundleConfig) -> SampledEvaluationData:
    """Generate the synthetic log and turn it into sequences over the full catalogue."""
    log = generate(
        SyntheticConfig(
            users=config.users,
            items=config.items,
            mean_length=config.mean_length,
            max_length=config.max_length,
            zipf=config.zipf,
            seed=config.seed,
        )
    )
    log.source = (
        f"synthetic:users={config.users},items={config.items},mean_length={config.mean_length},"
        f"max_length={config.max_length},zipf={config.zipf},seed={config.seed}"
    )
    data = with_full_catalogue(build_sequences(log), config.items)
    values = {f.name: getattr(data, f.name) for f in fields(SequenceData)}
    return SampledEvaluationData(**values, eval_sample=config.eval_users, eval_seed=config.seed)


def train_encoder(data: SequenceData, config: PerfBundleConfig, run_dir: Path):
    """A brief training run (``config.epochs`` epochs) with the project's trainer.

    With a million items a step's cost is dominated by the optimizer's dense update of the
    item table (AdamW touches every row, rows without gradient included), not by the batch,
    so large batches buy many more examples per second.
    """
    train_config = TrainConfig(
        model=config.model,
        loss="sampled_softmax",
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        patience=config.epochs,
        seed=config.seed,
        threads=config.threads,
        device=config.train_device,
        # One window per user: the bundle is for serving speed, each step costs a dense
        # update of a million-row table, and steps_per_epoch counts users.
        windows="last",
        model_options=config.model_options(),
    )
    return train(data, train_config, run_dir)


def steps_per_epoch(data: SequenceData, batch_size: int) -> int:
    starts, _ = training_windows(data)
    return -(-len(starts) // batch_size)


def remove_perf_bundle(models_dir: Path, name: str) -> None:
    """Delete an existing bundle ``name``; only a perf-only one that is not CURRENT."""
    path = bundle_dir(models_dir, name)
    if not path.exists():
        return
    if not read_manifest(path).get("perf_only"):
        raise BundleError(f"{path}: not a perf-only bundle; refusing to replace it")
    current = Path(models_dir) / CURRENT
    if current.is_file() and current.read_text(encoding="utf-8").strip() == name:
        raise BundleError(f"{path}: named by {current}; refusing to replace it")
    shutil.rmtree(path)


def save_heldout_queries(bundle: Path, data: SequenceData, out: Path) -> np.ndarray:
    """The held-out user embeddings the export measured recall on, for bench/index.py."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    entry = manifest["retrievers"][manifest["default_encoder"]]
    encoder = OnnxUserEncoder(bundle / entry["files"]["user_encoder"], "cpu")
    queries = heldout_user_embeddings(encoder, data, int(entry["max_len"]))
    np.save(out, queries, allow_pickle=False)
    return queries


def make_perf_bundle(
    config: PerfBundleConfig,
    models_dir: str | Path,
    name: str = "perf-1m",
    *,
    run_dir: str | Path | None = None,
    make_current: bool = False,
    replace: bool = False,
) -> dict:
    """Generate, train, export; returns a summary (also written to ``run_dir``)."""
    models_dir = Path(models_dir)
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / name
    run_dir.mkdir(parents=True, exist_ok=True)
    if replace:
        remove_perf_bundle(models_dir, name)
    elif bundle_dir(models_dir, name).exists():
        raise BundleError(f"bundle {name!r} exists in {models_dir}; pass --replace to rebuild")
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    data = build_data(config)
    seconds["generate"] = time.perf_counter() - started
    seen = int((np.bincount(data.items, minlength=data.n_items + 1)[1:] > 0).sum())
    LOG.info(
        "data: %d users, %d items (%d seen), %d interactions in %.0fs",
        data.n_users,
        data.n_items,
        seen,
        len(data.items),
        seconds["generate"],
    )

    started = time.perf_counter()
    result = train_encoder(data, config, run_dir)
    seconds["train"] = time.perf_counter() - started

    started = time.perf_counter()
    ctr = None
    if config.ctr_users:
        # A sample of users is enough: the head exists so that the serving path includes
        # the rerank stage the service runs, not to be a good ranker of synthetic data.
        ctr = CtrConfig(max_users=config.ctr_users, epochs=config.ctr_epochs, seed=config.seed)
    path = export_bundle(
        [result.checkpoint],
        data,
        models_dir,
        name=name,
        index=config.index,
        index_options=config.index_options or None,
        index_device=config.index_device,
        make_current=make_current,
        perf_only=True,
        ctr=ctr,
    )
    seconds["export"] = time.perf_counter() - started
    queries = save_heldout_queries(path, data, run_dir / "heldout_queries.npy")

    manifest = read_manifest(path)
    entry = manifest["retrievers"][manifest["default_encoder"]]
    metrics = result.report["metrics"]
    summary = {
        "bundle": str(path),
        "perf_only": manifest["perf_only"],
        "config": asdict(config),
        "data": {**manifest["dataset"], "items_seen": seen},
        "seconds": seconds,
        "train": {
            "steps": steps_per_epoch(data, config.batch_size) * result.report["epochs_run"],
            "loss": result.report["history"][-1]["loss"],
            "test": metrics["model"]["test"],
            "popularity_test": metrics["popularity"]["test"],
        },
        "index": entry["index"],
        "bundle_bytes": sum(f["bytes"] for f in manifest["files"].values()),
        "queries_file": str(run_dir / "heldout_queries.npy"),
        "queries": int(len(queries)),
    }
    (run_dir / "perf_bundle_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def format_summary(summary: dict) -> str:
    index, data, seconds = summary["index"], summary["data"], summary["seconds"]
    test, popular = summary["train"]["test"], summary["train"]["popularity_test"]
    spec = index["spec"]
    lines = [
        f"bundle        {summary['bundle']} (perf_only={summary['perf_only']})",
        f"data          {data['users']:,} users, {data['items']:,} items "
        f"({data['items_seen']:,} seen), {data['interactions']:,} interactions",
        f"training      {summary['train']['steps']} steps, loss {summary['train']['loss']:.3f}; "
        f"test recall@10 {test['recall@10']:.4f} (popularity {popular['recall@10']:.4f}) "
        f"on {test['users']} users",
        f"index         {spec['factory']} nprobe={spec['nprobe']} rescore={spec['rescore']}",
        f"  recall      @10 {index['recall@10']:.4f}  @100 {index['recall@100']:.4f} "
        f"(vs exact, {index['queries']} held-out users)",
        f"  size        {index['bytes_per_vector']:.1f} bytes/vector vs "
        f"{index['float32_bytes_per_vector']} float32: {index['compression']:.1f}x smaller",
        f"  build       {index['build_seconds']:.0f}s",
        f"  query       p50 {index['query_ms_p50']:.2f} ms, p99 {index['query_ms_p99']:.2f} ms "
        "(one query, top-100)",
        f"bundle size   {summary['bundle_bytes'] / 2**20:,.0f} MiB on disk",
        "times         "
        + ", ".join(f"{stage} {value:.0f}s" for stage, value in seconds.items())
        + f", total {sum(seconds.values()):.0f}s",
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.make_perf_bundle",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_bundle_flags(parser)
    parser.add_argument("--name", default="perf-1m", help="bundle name (default perf-1m)")
    parser.add_argument("--run-dir", type=Path, help="training run folder (default runs/NAME)")
    parser.add_argument("--make-current", action="store_true", help="point CURRENT at it")
    parser.add_argument("--replace", action="store_true", help="rebuild an existing perf bundle")
    parser.add_argument("--items", type=int)
    parser.add_argument("--users", type=int)
    parser.add_argument("--mean-length", type=float)
    add_model_flags(parser, "--model", "--max-len", "--dim", models=("two_tower", "sasrec"))
    add_training_flags(parser, "--batch-size", "--lr", "--epochs", "--seed", "--threads")
    parser.add_argument("--eval-users", type=int)
    parser.add_argument("--train-device", help="torch device for training")
    parser.add_argument(
        "--ctr-users",
        type=int,
        help="users whose candidates train the CTR head (0: a bundle without a head)",
    )
    parser.add_argument("--ctr-epochs", type=int)
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    # Flags are named after PerfBundleConfig's fields and default to its values.
    defaults = asdict(PerfBundleConfig())
    parser.set_defaults(**{k: v for k, v in defaults.items() if k != "index_options"})
    return parser


def config_from_args(args: argparse.Namespace) -> PerfBundleConfig:
    """The config of the parsed flags; ``--nprobe`` and ``--rescore`` become index options."""
    settings = [f.name for f in fields(PerfBundleConfig) if f.name != "index_options"]
    values = {name: getattr(args, name) for name in settings}
    return PerfBundleConfig(**{**values, "index_options": index_options(args)})


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    started = time.perf_counter()
    try:
        summary = make_perf_bundle(
            config_from_args(args),
            args.models_dir,
            args.name,
            run_dir=args.run_dir,
            make_current=args.make_current,
            replace=args.replace,
        )
    except (TrainingError, RecserveError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(f"wall time     {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

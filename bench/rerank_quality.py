"""Rerank quality: retrieval-only vs retrieval + CTR head, the head trained with Adam and AdaTask.

    # with an existing checkpoint (e.g. from the MovieLens-1M benchmark in docs/BENCHMARKS.md)
    .venv/bin/python bench/rerank_quality.py --data ml-1m:../shared/data/ml-1m \
        --checkpoint runs/ml1m-sasrec/checkpoint.pt
    # or train the retriever first (SASRec-kind, max length 200; long on 2 cores)
    .venv/bin/python bench/rerank_quality.py --data ml-1m:../shared/data/ml-1m

Steps: export the checkpoint into a bundle (not made CURRENT) so the head sees exactly
what the service serves (ONNX user encoder + faiss index); retrieve the candidates of every
user's valid and test events once (``training.ctr.prepare_ctr_data``); train the head
with Adam on the summed task losses and with ``AdaTaskAdam``; export each head to ONNX
and check parity; then report, on the test events, NDCG@10 and Recall@10 of the retrieval
order and of the reranked order at each depth (default 100 and 200 candidates, seen items
masked), AUC and log loss per task (held-out users' valid groups and test groups), and the
head's median latency for one request of ``max(depths)`` candidates (onnxruntime, CPU, one
thread), with and without building the features. Each head also meets the export's rerank
gate (``training.rerank_gate``: its NDCG@10 effect on the held-out users' valid events at
the training depth, a paired bootstrap interval, the decision) beside its effect on the
test events at that depth with the same interval, and whether the decision was right on
the test. Results go to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.errors import RecserveError  # noqa: E402
from service.ranking import CtrHead, RerankJob, rerank  # noqa: E402
from training import cli_options  # noqa: E402
from training.ctr import (  # noqa: E402
    CtrConfig,
    candidate_vectors,
    prepare_ctr_data,
    rerank_quality,
    train_ctr_head,
)
from training.data import build_sequences  # noqa: E402
from training.datasets import load_dataset  # noqa: E402
from training.errors import TrainingError  # noqa: E402
from training.export import export_bundle, served_rerank_quality  # noqa: E402
from training.onnx_export import check_head_parity, export_ctr_head  # noqa: E402
from training.optimizers import OPTIMIZERS  # noqa: E402
from training.rerank_gate import GateConfig, gate_head, verdict_on_test  # noqa: E402
from training.trainer import train  # noqa: E402


def retriever_checkpoint(data, args) -> Path:
    """The given checkpoint, or one trained now with the benchmark's settings."""
    if args.checkpoint:
        return Path(args.checkpoint)
    return train(data, cli_options.train_config(args), Path(args.run_dir) / "retriever").checkpoint


def measure_latency(head, prepared, data, depth: int, runs: int) -> dict[str, float]:
    """Median and p99 ms of one request of ``depth`` candidates: the head alone, and the
    features plus the head (``service.ranking.rerank``, serving-side item features)."""
    test = prepared.test.first(depth)
    vectors = prepared.retriever.index.vectors
    row = int(np.argmax((test.ids > 0).sum(axis=1)))  # a full candidate list
    user, ids, scores = test.user[row : row + 1], test.ids[row : row + 1], test.scores[row]
    cand = candidate_vectors(vectors, ids)
    feats = test.features[row : row + 1]
    serving_items = replace(prepared.items, event_keys=None)  # what a bundle gives
    u = int(test.users[row])
    start, end = int(data.offsets[u]), int(data.offsets[u + 1]) - 1  # test history
    history_ids, history_ts = data.items[start:end], data.timestamps[start:end]
    request_time = int(data.timestamps[end])

    def timed(call) -> list[float]:
        for _ in range(min(10, runs)):
            call()
        out = []
        for _ in range(runs):
            started = time.perf_counter()
            call()
            out.append((time.perf_counter() - started) * 1000)
        return out

    alone = timed(lambda: head.score(user, cand, feats))
    full = timed(
        lambda: rerank(
            head,
            serving_items,
            vectors,
            RerankJob(
                user_embedding=user[0],
                candidate_ids=ids[0],
                retrieval_scores=scores,
                history_ids=history_ids,
                history_ts=history_ts,
                request_time=request_time,
            ),
        )
    )
    return {
        "candidates": int((ids > 0).sum()),
        "head_p50": float(np.median(alone)),
        "head_p99": float(np.percentile(alone, 99)),
        "features_and_head_p50": float(np.median(full)),
        "features_and_head_p99": float(np.percentile(full, 99)),
    }


def remeasure_latency(data, args) -> int:
    """Latency of the heads recorded in ``args.results``, measured again; the file is updated."""
    result = json.loads(args.results.read_text())
    config = CtrConfig(**{**result["config"], "deep": tuple(result["config"]["deep"])})
    prepared = prepare_ctr_data(data, Path(result["bundle"]), config, max(result["depths"]))
    for name, head in result["heads"].items():
        session = CtrHead(head["onnx"], device="cpu", threads=1, feature_names=head["features"])
        head["latency_ms"] = measure_latency(
            session, prepared, data, max(result["depths"]), args.latency_runs
        )
        head["latency_ms"]["measured_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        print(f"{name}: {json.dumps(head['latency_ms'])}", flush=True)
    args.results.write_text(json.dumps(result, indent=2))
    return 0


def table(result: dict) -> str:
    lines = [
        "| head | candidates | NDCG@10 retrieval | NDCG@10 reranked | "
        "Recall@10 retrieval | Recall@10 reranked |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, head in result["heads"].items():
        for depth in result["depths"]:
            entry = head["ranking"][str(depth)]
            lines.append(
                f"| {name} | {depth} | {entry['retrieval']['ndcg@10']:.4f} | "
                f"{entry['reranked']['ndcg@10']:.4f} | {entry['retrieval']['recall@10']:.4f} | "
                f"{entry['reranked']['recall@10']:.4f} |"
            )
    lines += ["", "| head | split | task | AUC | log loss | retrieval-score AUC |"]
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for name, head in result["heads"].items():
        for split in ("holdout_valid", "test"):
            for task in result["tasks"]:
                entry = head[split][task]
                lines.append(
                    f"| {name} | {split} | {task} | {entry['auc']:.4f} | "
                    f"{entry['log_loss']:.4f} | {entry['retrieval_auc']:.4f} |"
                )
    lines += [
        "",
        "| head | validation difference (95% CI) | rerank by default | "
        "test difference (95% CI) | right on test |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, head in result["heads"].items():
        gate = head["gate"]
        valid, test = gate["ci"], gate["test"]["ci"]
        lines.append(
            f"| {name} | {gate['delta']:+.4f} [{valid[0]:+.4f}, {valid[1]:+.4f}] | "
            f"{'yes' if gate['rerank_by_default'] else 'no'} | {gate['test']['delta']:+.4f} "
            f"[{test[0]:+.4f}, {test[1]:+.4f}] | {gate['verdict']} |"
        )
    lines += ["", "| head | head p50 ms | features + head p50 ms |", "| --- | --- | --- |"]
    for name, head in result["heads"].items():
        latency = head["latency_ms"]
        lines.append(
            f"| {name} | {latency['head_p50']:.3f} | {latency['features_and_head_p50']:.3f} |"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli_options.add_data_flags(parser, default="ml-1m:../shared/data/ml-1m")
    parser.add_argument("--checkpoint", help="a trained retriever (default: train one)")
    parser.add_argument("--bundle", help="an exported bundle folder to use instead of exporting")
    # The retriever trained when no --checkpoint is given:
    cli_options.add_model_flags(parser, "--model", "--max-len", "--dim")
    cli_options.add_training_flags(
        parser, "--epochs", "--patience", "--eval-every", "--batch-size", "--lr", "--device"
    )
    cli_options.add_bundle_flags(parser, "--models-dir")  # default: RUN_DIR/models
    parser.set_defaults(epochs=200, eval_every=2, max_len=200, models_dir=None)
    parser.add_argument("--run-dir", default=str(REPO / "runs" / "rerank"))
    parser.add_argument("--candidates", type=int, default=200, help="training depth N")
    parser.add_argument("--depths", type=int, nargs="+", default=[100, 200])
    parser.add_argument("--head-epochs", type=int, default=20)
    parser.add_argument("--head-lr", type=float, default=1e-3)
    parser.add_argument("--head-batch-size", type=int, default=32)
    parser.add_argument("--max-users", type=int, default=0, help="subsample users (0: all)")
    parser.add_argument("--negatives", type=int, default=0, help="per group (0: all)")
    # The heads' seed and every torch computation's threads (the retriever's seed stays 0).
    parser.add_argument("--seed", dest="head_seed", type=int, default=0)
    parser.add_argument("--latency-runs", type=int, default=200)
    parser.add_argument(
        "--threads", dest="torch_threads", type=int, default=0, help="torch threads (0: default)"
    )
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "rerank_quality.json")
    parser.add_argument(
        "--remeasure-latency",
        action="store_true",
        help="train nothing: measure the heads of an earlier run (its --results file) again, "
        "e.g. on a quieter machine, and update their latency in that file",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except (TrainingError, RecserveError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(args) -> int:
    """Retriever bundle, candidates, both heads, their quality and latency; the JSON file."""
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    run_dir = Path(args.run_dir)
    data = build_sequences(load_dataset(args.data, args.skip_malformed))
    if args.remeasure_latency:
        return remeasure_latency(data, args)
    started = time.perf_counter()
    if args.bundle:
        bundle = Path(args.bundle)
        checkpoint = None
    else:
        checkpoint = retriever_checkpoint(data, args)
        name = datetime.now(timezone.utc).strftime("rerank-%Y%m%d-%H%M%S")
        models_dir = Path(args.models_dir) if args.models_dir else run_dir / "models"
        bundle = export_bundle([checkpoint], data, models_dir, name=name, make_current=False)
    print(f"== retriever bundle {bundle} ({time.perf_counter() - started:.0f}s)", flush=True)

    config = CtrConfig(
        candidates=args.candidates,
        epochs=args.head_epochs,
        lr=args.head_lr,
        batch_size=args.head_batch_size,
        max_users=args.max_users,
        negatives=args.negatives,
        seed=args.head_seed,
    )
    prepared = prepare_ctr_data(data, bundle, config, test_depth=max(args.depths))
    vectors = prepared.retriever.index.vectors
    result = {
        "data": data.summary(),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "bundle": str(bundle),
        "depths": list(args.depths),
        "config": asdict(config),
        "heads": {},
    }
    heads_dir = run_dir / "heads"
    heads_dir.mkdir(parents=True, exist_ok=True)
    for optimizer in OPTIMIZERS:
        print(f"== head with {optimizer}", flush=True)
        head, report = train_ctr_head(
            data, bundle, replace(config, optimizer=optimizer), prepared=prepared
        )
        result["tasks"] = report["tasks"]
        path = heads_dir / f"ctr_head_{optimizer}.onnx"
        export_ctr_head(head, path)
        parity = check_head_parity(head, path)
        session = CtrHead(path, device="cpu", threads=1, feature_names=report["features"])
        report["onnx_parity_max_abs_diff"] = parity
        report["ranking"] = rerank_quality(session.score, prepared.test, vectors, args.depths)
        # The gate as the export runs it, and the test at the same depth to judge it by.
        gate = gate_head(session.score, prepared.holdout_valid(), vectors, config.candidates)
        served = served_rerank_quality(
            session, prepared.test, vectors, config.candidates, GateConfig()
        )
        report["gate"] = {
            **gate,
            "test": served,
            "verdict": verdict_on_test(gate["rerank_by_default"], served["delta"], served["ci"]),
        }
        report["latency_ms"] = measure_latency(
            session, prepared, data, max(args.depths), args.latency_runs
        )
        report["onnx"] = str(path)
        report.pop("config")
        result["heads"][optimizer] = report
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(result, indent=2))
    if len(result["tasks"]) == 1:
        result["note"] = "one task (the data has no second label): AdaTask reduces to Adam"
        print(result["note"])
    result["wall_seconds"] = time.perf_counter() - started
    args.results.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"results: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

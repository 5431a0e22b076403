"""Export trained encoders into a versioned bundle the service loads.

    python -m training export --data synthetic --checkpoint runs/default/checkpoint.pt \
        --models-dir models [--name NAME] [--index auto|Flat|"OPQ16,IVF1024,PQ16x8"|HNSW32]

For each checkpoint (one retriever per encoder kind) it writes:
- ``user_encoder.onnx``: an inference wrapper (eval mode, normalisation included) with
  dynamic batch size and sequence length; onnxruntime is checked against PyTorch at
  several (batch, length) pairs, lengths not used when exporting included, and the export
  fails when they differ by more than ``training.onnx_export.PARITY_TOLERANCE``;
- ``item_embeddings.npy`` and ``items.faiss``: the item vectors and the index chosen for
  the catalogue size (``IndexSpec.auto``), with recall@10/@100 against exact search on
  held-out users, bytes per vector and query latency in the manifest.
- with a ``CtrConfig``, ``ctr_head.onnx``: a CTR head trained on what the exported encoder
  and index retrieve (``training.ctr``), checked against PyTorch the same way; its effect
  goes into the manifest as ``ctr_head.rerank_quality``: NDCG@10 and Recall@10 on the test
  events in retrieval order and reranked by the exported head, at the head's depth, with
  a bootstrap interval of the NDCG@10 difference. Whether the head reranks by default is
  decided on validation users it never trained on, never on the test events
  (``training.rerank_gate``, ``--rerank-default auto|on|off``): ``ctr_head.gate``.
- when the data has item metadata (titles, genres), ``metadata_encoder.onnx``: the
  retriever's item-metadata encoder (``training.cold_start``), which gives an item the
  retriever never saw a vector in its space, with its quality on held-out items and its
  parity in the manifest; the vocabulary it reads (``item_metadata_vocabulary.json``, one
  per bundle) beside ``items.parquet``.
The bundle then gets ``items.parquet`` and a manifest with checksums, and becomes CURRENT.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from service.bundle import ITEMS, BundleWriter, retriever_dir
from service.catalogue import write_items_table
from service.devices import faiss_gpus
from service.encoder import OnnxUserEncoder
from service.features import last_seen_from_events
from service.histories import left_padded_window
from service.item_metadata import INPUT_NAMES as METADATA_INPUTS
from service.item_metadata import OUTPUT_NAME as METADATA_OUTPUT
from service.item_metadata import VOCABULARY
from service.ranking import CtrHead
from service.retrieval import IndexSpec, ItemIndex, measure_recall
from training.cold_start import (
    CatalogueMetadata,
    ColdStartConfig,
    catalogue_metadata,
    fit_metadata_encoder,
    has_metadata,
)
from training.console import PROGRESS
from training.ctr import (
    CtrConfig,
    RetrieverParts,
    prepare_ctr_data,
    rerank_quality,
    train_ctr_head,
)
from training.data import SequenceData
from training.errors import ExportError
from training.models.ctr_head import CtrHeadModel
from training.onnx_export import (
    check_encoder_parity,
    check_head_parity,
    check_metadata_encoder_parity,
    export_ctr_head,
    export_metadata_encoder,
    export_user_encoder,
)
from training.rerank_gate import GateConfig, gate_head, paired_bootstrap, per_user_ndcg
from training.trainer import check_same_items, load_checkpoint

LOG = logging.getLogger(__name__)

RECALL_QUERIES = 1000
DEFAULT_COLD_START = ColdStartConfig()


def heldout_user_embeddings(
    encoder: OnnxUserEncoder,
    data: SequenceData,
    max_len: int,
    limit: int = RECALL_QUERIES,
    *,
    split: str = "test",
) -> np.ndarray:
    """Embeddings of up to ``limit`` evaluation users' histories before their ``split``
    event ("test", or "valid": training events only), via the ONNX graph."""
    users, history_end, _ = data.eval_examples(split)
    chosen = np.random.default_rng(0).permutation(len(users))[:limit]
    embeddings = []
    for lo in range(0, len(chosen), 256):
        rows = chosen[lo : lo + 256]
        ids, deltas = left_padded_window(
            data.items, data.timestamps, data.offsets[users[rows]], history_end[rows], max_len
        )
        embeddings.append(encoder.encode(ids, deltas))
    return np.concatenate(embeddings) if embeddings else np.zeros((0, 1), np.float32)


def index_spec_for(
    index: str, n_items: int, dim: int, options: dict | None = None, gpu: bool = False
) -> IndexSpec:
    """``auto`` (by catalogue size, and for a GPU with ``gpu``) or a faiss factory string,
    with parameter overrides."""
    spec = IndexSpec.auto(n_items, dim, gpu=gpu) if index == "auto" else IndexSpec(factory=index)
    return replace(spec, **(options or {}))


def export_retriever(
    writer: BundleWriter,
    checkpoint: Path,
    data: SequenceData,
    *,
    index: str = "auto",
    index_options: dict | None = None,
    index_device: str = "auto",
) -> tuple[str, dict]:
    """Write one encoder's files into the bundle; returns its name and manifest entry.

    ``index_device`` says where the index will be searched (``auto``: on a GPU when faiss
    sees one here), which decides the kind of index ``auto`` builds."""
    model, payload = load_checkpoint(checkpoint)
    check_same_items(checkpoint, payload, data)
    name = payload["model"]
    folder = retriever_dir(name)
    onnx_path = writer.path(f"{folder}/user_encoder.onnx")
    started = time.perf_counter()
    export_user_encoder(model, onnx_path)
    parity = check_encoder_parity(model, onnx_path)
    LOG.info("%s: ONNX export %.1fs, parity %.1e", name, time.perf_counter() - started, parity)

    with torch.no_grad():
        vectors = model.all_item_embeddings().detach().float().numpy().copy()
    vectors[0] = 0.0
    vectors_path = writer.path(f"{folder}/item_embeddings.npy")
    np.save(vectors_path, vectors, allow_pickle=False)
    gpu = faiss_gpus(index_device) > 0
    spec = index_spec_for(index, data.n_items, vectors.shape[1], index_options, gpu=gpu)
    started = time.perf_counter()
    item_index = ItemIndex.build(np.load(vectors_path, mmap_mode="r"), spec)
    build_seconds = time.perf_counter() - started
    item_index.save(writer.path(f"{folder}/items.faiss"))
    queries = heldout_user_embeddings(OnnxUserEncoder(onnx_path, "cpu"), data, model.max_len)
    quality = measure_recall(item_index, queries)
    bytes_per_vector = item_index.memory_bytes() / data.n_items
    LOG.info("%s: index %s recall %s", name, spec.factory, quality)
    PROGRESS.info(
        "%s: exported (ONNX parity %.1e, index %s, recall@10 %.3f)",
        name,
        parity,
        spec.factory,
        quality["recall@10"],
    )
    report = json.loads(payload["report"])
    entry = {
        "model": name,
        "max_len": model.max_len,
        "dim": int(vectors.shape[1]),
        "normalize_items": bool(model.normalize_items),
        "model_config": payload["model_config"],
        "train_config": json.loads(payload["train_config"]),
        "offline_metrics": report.get("metrics"),
        "onnx_parity_max_abs_diff": parity,
        "index": {
            "spec": item_index.spec.to_dict(),
            "build_seconds": build_seconds,
            "bytes_per_vector": bytes_per_vector,
            "float32_bytes_per_vector": 4 * int(vectors.shape[1]),
            "compression": 4 * int(vectors.shape[1]) / bytes_per_vector,
            "queries": int(len(queries)),
            **quality,
        },
        "files": {
            "user_encoder": f"{folder}/user_encoder.onnx",
            "item_embeddings": f"{folder}/item_embeddings.npy",
            "index": f"{folder}/items.faiss",
        },
    }
    return name, entry


def add_ctr_head(
    writer: BundleWriter,
    entry: dict,
    data: SequenceData,
    config: CtrConfig,
    gate: GateConfig | None = None,
) -> None:
    """Train a CTR head on what this retriever's exported files retrieve; add it to the
    bundle with the exported head's effect on the test events (``rerank_quality``) and
    whether it reranks by default (``gate``: decided on the held-out users' valid events
    by ``training.rerank_gate``, or forced by ``gate.rerank_default``)."""
    gate = gate or GateConfig()
    started = time.perf_counter()
    files = entry["files"]
    vectors = np.load(writer.root / files["item_embeddings"], mmap_mode="r")
    parts = RetrieverParts(
        encoder=OnnxUserEncoder(writer.root / files["user_encoder"], "cpu"),
        index=ItemIndex.load(
            writer.root / files["index"], vectors, IndexSpec(**entry["index"]["spec"]), "cpu"
        ),
        max_len=entry["max_len"],
    )
    prepared = prepare_ctr_data(data, parts, config)
    head, report = train_ctr_head(data, parts, config, prepared=prepared)
    relative = f"{retriever_dir(entry['model'])}/ctr_head.onnx"
    path = writer.path(relative)
    export_ctr_head(head, path)
    entry["ctr_head"] = head_manifest_entry(head, report, check_head_parity(head, path), relative)
    files["ctr_head"] = relative
    served = CtrHead(path, device="cpu", feature_names=report["features"])
    # The exported graph decides, as it will serve: on the held-out users' valid groups,
    # at the depth it was trained for (the service's default depth where the export
    # follows the quickstart).
    decision = gate_head(
        served.score, prepared.holdout_valid(), parts.index.vectors, config.candidates, gate
    )
    entry["ctr_head"]["gate"] = decision
    quality = served_rerank_quality(
        served, prepared.test, parts.index.vectors, config.candidates, gate
    )
    entry["ctr_head"]["rerank_quality"] = quality
    PROGRESS.info(
        "%s: CTR head trained (test NDCG@10 %.4f in retrieval order, %.4f reranked; "
        "rerank by default: %s, by the %s) %.1fs",
        entry["model"],
        quality["retrieval"]["ndcg@10"],
        quality["reranked"]["ndcg@10"],
        "yes" if decision["rerank_by_default"] else "no",
        decision["decided_by"],
        time.perf_counter() - started,
    )


def served_rerank_quality(
    head: CtrHead, test, vectors: np.ndarray, depth: int, gate: GateConfig | None = None
) -> dict:
    """NDCG@10 and Recall@10 of the test events in retrieval order and reranked by the
    exported head over ``depth`` candidates (``training.ctr.rerank_quality``), flat, with
    the mean per-user NDCG difference and its paired bootstrap interval drawn as the gate
    draws its own (``gate``), so the gate's decision can be checked against the test."""
    gate = gate or GateConfig()
    quality = rerank_quality(head.score, test, vectors, depths=(depth,))
    result = {"split": "test", "users": quality["users"], "depth": depth, **quality[str(depth)]}
    retrieval, reranked = per_user_ndcg(head.score, test.first(depth), vectors, gate.cutoff)
    if len(retrieval):
        differences = reranked - retrieval
        low, high = paired_bootstrap(differences, gate.resamples, gate.seed, gate.confidence)
        result.update(delta=float(differences.mean()), ci=[low, high])
    return result


def head_manifest_entry(head: CtrHeadModel, report: dict, parity: float, relative: str) -> dict:
    """The ``ctr_head`` entry of a retriever in the bundle manifest."""
    return {
        "file": relative,
        "feature_names": list(head.config.feature_names),
        "tasks": list(head.config.tasks),
        "served_task": head.config.tasks[0],
        "head_config": {**asdict(head.config), "deep": list(head.config.deep)},
        "onnx_parity_max_abs_diff": parity,
        "metrics": {k: report[k] for k in ("holdout_valid", "test") if k in report},
        "optimizer": report.get("config", {}).get("optimizer"),
    }


def add_metadata_encoder(
    writer: BundleWriter,
    entry: dict,
    data: SequenceData,
    metadata: CatalogueMetadata,
    config: ColdStartConfig,
) -> None:
    """Fit this retriever's item-metadata encoder on its exported item vectors (targets:
    the items with training events; the users whose scores it should reproduce: the
    exported encoder's embeddings of training histories) and add it, parity checked, to
    the bundle."""
    files = entry["files"]
    vectors = np.load(writer.root / files["item_embeddings"], allow_pickle=False)
    encoder = OnnxUserEncoder(writer.root / files["user_encoder"], "cpu")
    queries = heldout_user_embeddings(encoder, data, entry["max_len"], split="valid")
    trained = data.train_item_counts() > 0
    fit = fit_metadata_encoder(vectors, metadata, trained, queries=queries, config=config)
    relative = f"{retriever_dir(entry['model'])}/metadata_encoder.onnx"
    path = writer.path(relative)
    started = time.perf_counter()
    export_metadata_encoder(fit.model, path)
    parity = check_metadata_encoder_parity(fit.model, path, metadata.vocabulary)
    LOG.info(
        "%s: metadata encoder ONNX export %.1fs", entry["model"], time.perf_counter() - started
    )
    entry["metadata_encoder"] = {
        "file": relative,
        "vocabulary": VOCABULARY,
        "inputs": list(METADATA_INPUTS),
        "output": METADATA_OUTPUT,
        "model_config": asdict(fit.model.config),
        "onnx_parity_max_abs_diff": parity,
        **fit.report,
    }
    files["metadata_encoder"] = relative
    files["metadata_vocabulary"] = VOCABULARY


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def export_bundle(
    checkpoints: list[Path],
    data: SequenceData,
    models_dir: str | Path,
    *,
    name: str | None = None,
    index: str = "auto",
    index_options: dict | None = None,
    make_current: bool = True,
    perf_only: bool = False,
    ctr: CtrConfig | None = None,
    index_device: str = "auto",
    cold_start: ColdStartConfig | None = DEFAULT_COLD_START,
    gate: GateConfig | None = None,
) -> Path:
    """Export every checkpoint into one new bundle and (by default) make it CURRENT.

    With ``ctr`` (a ``training.ctr.CtrConfig``) each retriever also gets a CTR head trained
    on the candidates its exported encoder and index retrieve, and ``gate`` (default: the
    measurement decides) says whether it reranks by default. Where the data has item
    metadata each retriever gets a metadata encoder fitted with ``cold_start`` (None: none).
    """
    if not checkpoints:
        raise ExportError("no checkpoint to export")
    created = datetime.now(timezone.utc)
    name = name or created.strftime("bundle-%Y%m%d-%H%M%S")
    with BundleWriter(models_dir, name) as writer:
        retrievers = {}
        for checkpoint in checkpoints:
            encoder, entry = export_retriever(
                writer,
                Path(checkpoint),
                data,
                index=index,
                index_options=index_options,
                index_device=index_device,
            )
            if encoder in retrievers:
                raise ExportError(f"two checkpoints of the same encoder kind {encoder!r}")
            retrievers[encoder] = entry
        counts = data.train_item_counts()
        metadata = data.metadata
        write_items_table(
            writer.path(ITEMS),
            data.item_map.raw.tolist(),
            counts,
            titles=metadata.titles if metadata else None,
            genres=metadata.genres if metadata else None,
            last_seen=last_seen_from_events(data.n_items, *data.training_events()),
        )
        if ctr is not None:
            for entry in retrievers.values():
                add_ctr_head(writer, entry, data, ctr, gate)
        if cold_start is not None and has_metadata(data):
            catalogue = catalogue_metadata(data, cold_start.min_count)
            writer.path(VOCABULARY).write_text(catalogue.vocabulary.to_json(), encoding="utf-8")
            for entry in retrievers.values():
                add_metadata_encoder(writer, entry, data, catalogue, cold_start)
        manifest = {
            "created_at": created.isoformat(),
            "git_commit": git_commit(),
            "perf_only": perf_only,
            "dataset": data.summary(),
            "default_encoder": next(iter(retrievers)),
            "retrievers": retrievers,
        }
        return writer.commit(manifest, make_current=make_current)

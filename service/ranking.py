"""Reranking retrieved candidates with the bundle's CTR head (an ONNX graph).

``CtrHead`` runs ``ctr_head.onnx``: inputs ``user_embedding`` float32 (B, D),
``candidate_embeddings`` float32 (B, C, D) and ``candidate_features`` float32 (B, C, F)
(``service.features``), output ``logits`` float32 (B, C). ``rerank`` orders one request's
candidates by those logits. It only ever reorders what retrieval returned, after removing
padding and the excluded (seen) items, so a masked item can never come back.

The features are built by ``head_inputs`` here, which is exactly what the training
pipeline (``training.ctr``) calls for its examples; seen items are dropped by
``service.filters``, as everywhere else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from service.devices import onnx_session
from service.features import HISTORY_WINDOW, ItemFeatures, candidate_features
from service.filters import drop_seen

LOG = logging.getLogger(__name__)

INPUT_NAMES = ("user_embedding", "candidate_embeddings", "candidate_features")
OUTPUT_NAME = "logits"


class CtrHead:
    """One onnxruntime session over a CTR head graph."""

    def __init__(
        self,
        path: str | Path,
        device: str = "auto",
        threads: int = 1,
        feature_names: list[str] | None = None,
    ):
        self.path = Path(path)
        self.session = onnx_session(path, device, threads)
        self.providers = self.session.get_providers()
        inputs = {i.name: i for i in self.session.get_inputs()}
        missing = [name for name in INPUT_NAMES if name not in inputs]
        if missing:
            raise ValueError(f"{path}: CTR head has no input(s) {', '.join(missing)}")
        width = inputs["candidate_features"].shape[-1]
        self.n_features = width if isinstance(width, int) else None
        self.feature_names = list(feature_names) if feature_names is not None else None
        if self.feature_names is not None and self.n_features not in (None, len(feature_names)):
            raise ValueError(
                f"{path}: the head takes {self.n_features} features, "
                f"{len(self.feature_names)} names given"
            )

    def score(
        self,
        user_embedding: np.ndarray,
        candidate_embeddings: np.ndarray,
        candidate_features: np.ndarray,
    ) -> np.ndarray:
        """Logits (B, C) for user (B, D), candidates (B, C, D) and features (B, C, F)."""
        (logits,) = self.session.run(
            [OUTPUT_NAME],
            {
                "user_embedding": np.ascontiguousarray(user_embedding, dtype=np.float32),
                "candidate_embeddings": np.ascontiguousarray(
                    candidate_embeddings, dtype=np.float32
                ),
                "candidate_features": np.ascontiguousarray(candidate_features, dtype=np.float32),
            },
        )
        return logits


@dataclass
class HeadInputs:
    """What the head reads for a batch of requests, with the candidates it was built for."""

    user: np.ndarray  # (b, d) float32
    candidates: np.ndarray  # (b, c, d) float32
    features: np.ndarray  # (b, c, f) float32
    feature_names: list[str]


def head_inputs(
    user_embedding: np.ndarray,
    candidate_ids: np.ndarray,
    retrieval_scores: np.ndarray,
    item_vectors: np.ndarray,
    *,
    history_ids: np.ndarray,
    history_ts: np.ndarray,
    request_time: np.ndarray,
    items: ItemFeatures,
) -> HeadInputs:
    """The head's three inputs for (B, C) candidates in retrieval order (0 = empty slot).

    ``item_vectors`` is the retriever's (N + 1, d) matrix (may be memory-mapped); the
    histories are (B, L) left-padded ids and times.
    """
    ids = np.asarray(candidate_ids, dtype=np.int64)
    # take() gathers rows of the (memory-mapped) table faster than fancy indexing; the
    # table's own, so that a service.live_catalogue.ItemVectors reads its added rows too.
    vectors = np.asarray(item_vectors.take(ids.ravel(), axis=0), dtype=np.float32).reshape(
        *ids.shape, item_vectors.shape[1]
    )
    vectors[ids == 0] = 0.0
    user = np.asarray(user_embedding, dtype=np.float32)
    features, names = candidate_features(
        user,
        ids,
        retrieval_scores,
        vectors,
        history_ids=history_ids,
        history_ts=history_ts,
        request_time=request_time,
        items=items,
    )
    return HeadInputs(user, vectors, features, names)


@dataclass
class RerankJob:
    """One request's share of a batched head call: its kept candidates and its history."""

    user_embedding: np.ndarray  # (d,)
    candidate_ids: np.ndarray  # (c,) internal ids in retrieval order, nothing to remove
    retrieval_scores: np.ndarray  # (c,)
    history_ids: np.ndarray  # (l,) known events, oldest first
    history_ts: np.ndarray  # (l,)
    request_time: int


@dataclass
class Reranked:
    ids: np.ndarray  # (c,) internal ids, best first
    logits: np.ndarray  # (c,) head logits
    retrieval_scores: np.ndarray  # (c,)
    retrieval_ranks: np.ndarray  # (c,) each item's 0-based position in retrieval order


def batch_head_inputs(
    items: ItemFeatures, item_vectors: np.ndarray, jobs: list[RerankJob]
) -> HeadInputs:
    """The head's inputs for several requests: candidate lists right-padded to the longest
    (padding slots get zero vectors and features), histories left-padded; every row's
    features are exactly those of the request alone."""
    width = max(len(job.candidate_ids) for job in jobs)
    # At least one (padding) column: the history features reduce over it.
    length = max(1, *(min(len(job.history_ids), HISTORY_WINDOW) for job in jobs))
    ids = np.zeros((len(jobs), width), dtype=np.int64)
    scores = np.zeros((len(jobs), width), dtype=np.float32)
    history_ids = np.zeros((len(jobs), length), dtype=np.int64)
    history_ts = np.zeros((len(jobs), length), dtype=np.int64)
    for row, job in enumerate(jobs):
        ids[row, : len(job.candidate_ids)] = job.candidate_ids
        scores[row, : len(job.retrieval_scores)] = job.retrieval_scores
        recent = min(len(job.history_ids), length)
        if recent:
            history_ids[row, length - recent :] = job.history_ids[-recent:]
            history_ts[row, length - recent :] = job.history_ts[-recent:]
    return head_inputs(
        np.stack([np.asarray(job.user_embedding, dtype=np.float32) for job in jobs]),
        ids,
        scores,
        item_vectors,
        history_ids=history_ids,
        history_ts=history_ts,
        request_time=np.array([job.request_time for job in jobs], dtype=np.int64),
        items=items,
    )


def rerank_batch(
    head: CtrHead, items: ItemFeatures, item_vectors: np.ndarray, jobs: list[RerankJob]
) -> list[Reranked]:
    """Each job's candidates reordered by the head's logits, in one head call for all.

    Ties keep retrieval order. ``service.pipeline.compute_batch`` calls this with the
    concurrent requests of a bundle's retriever.
    """
    results: list[Reranked | None] = [None] * len(jobs)
    scored = [i for i, job in enumerate(jobs) if len(job.candidate_ids)]
    for i in set(range(len(jobs))) - set(scored):
        empty = np.zeros(0, dtype=np.float32)
        nothing = np.zeros(0, dtype=np.int64)
        results[i] = Reranked(nothing, empty, empty, nothing)
    if scored:
        inputs = batch_head_inputs(items, item_vectors, [jobs[i] for i in scored])
        if head.feature_names is not None and head.feature_names != inputs.feature_names:
            raise ValueError(
                f"the head was trained on features {head.feature_names}, "
                f"the catalogue gives {inputs.feature_names}"
            )
        logits = head.score(inputs.user, inputs.candidates, inputs.features)  # (b, width)
        for row, i in enumerate(scored):
            job = jobs[i]
            mine = logits[row, : len(job.candidate_ids)]
            order = np.argsort(-mine, kind="stable")
            results[i] = Reranked(
                np.asarray(job.candidate_ids)[order],
                mine[order],
                np.asarray(job.retrieval_scores)[order],
                order,
            )
    return results


def rerank(
    head: CtrHead,
    items: ItemFeatures,
    item_vectors: np.ndarray,
    job: RerankJob,
    exclude: np.ndarray | None = None,
) -> Reranked:
    """One request's retrieved candidates (retrieval order, padding allowed) reordered by
    the head's logits, after padding and ``exclude`` (the seen items) are dropped, so that
    ranks and score gaps are those of the list that is served. Ties keep retrieval order.
    """
    candidates = np.asarray(job.candidate_ids, dtype=np.int64).reshape(-1)
    scores = np.asarray(job.retrieval_scores, dtype=np.float32).reshape(-1)
    unseen = np.zeros(0, np.int64) if exclude is None else np.asarray(exclude).reshape(-1)
    ((kept_ids, kept_scores),) = drop_seen([candidates], [scores], [unseen], [len(candidates)])
    kept = replace(
        job,
        user_embedding=np.asarray(job.user_embedding, dtype=np.float32).reshape(-1),
        candidate_ids=kept_ids,
        retrieval_scores=kept_scores,
        history_ids=np.asarray(job.history_ids, dtype=np.int64).reshape(-1),
        history_ts=np.asarray(job.history_ts, dtype=np.int64).reshape(-1),
    )
    return rerank_batch(head, items, item_vectors, [kept])[0]

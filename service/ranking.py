"""Reranking retrieved candidates with the bundle's CTR head (an ONNX graph).

``CtrHead`` runs ``ctr_head.onnx``: inputs ``user_embedding`` float32 (B, D),
``candidate_embeddings`` float32 (B, C, D) and ``candidate_features`` float32 (B, C, F)
(``service.features``), output ``logits`` float32 (B, C). ``rerank`` orders one request's
candidates by those logits. It only ever reorders what retrieval returned, after removing
padding and the excluded (seen) items, so a masked item can never come back.

The features are built by ``head_inputs`` here, which is exactly what the training
pipeline (``training.ctr``) calls for its examples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.devices import onnx_session
from service.features import ItemFeatures, candidate_features

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
    vectors = np.asarray(item_vectors[ids.ravel()], dtype=np.float32).reshape(
        *ids.shape, item_vectors.shape[1]
    )
    vectors[ids == 0] = 0.0
    user = np.asarray(user_embedding, dtype=np.float32)
    features, names = candidate_features(
        user, ids, retrieval_scores, vectors, history_ids, history_ts, request_time, items
    )
    return HeadInputs(user, vectors, features, names)


@dataclass
class Reranked:
    ids: np.ndarray  # (c,) internal ids, best first
    logits: np.ndarray  # (c,) head logits
    retrieval_scores: np.ndarray  # (c,)


def request_head_inputs(
    items: ItemFeatures,
    item_vectors: np.ndarray,
    user_embedding: np.ndarray,
    candidate_ids: np.ndarray,
    retrieval_scores: np.ndarray,
    history_ids: np.ndarray,
    history_ts: np.ndarray,
    request_time: int,
    exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, HeadInputs]:
    """One request's kept candidates (ids, scores) and head inputs (batch of one).

    Padding and ``exclude`` are removed first, so ranks and score gaps are those of the
    list that is served.
    """
    ids = np.asarray(candidate_ids, dtype=np.int64).reshape(-1)
    scores = np.asarray(retrieval_scores, dtype=np.float32).reshape(-1)
    keep = ids > 0
    if exclude is not None and len(exclude):
        keep &= ~np.isin(ids, exclude)
    ids, scores = ids[keep], scores[keep]
    inputs = head_inputs(
        np.asarray(user_embedding, dtype=np.float32).reshape(1, -1),
        ids[None],
        scores[None],
        item_vectors,
        np.asarray(history_ids, dtype=np.int64).reshape(1, -1),
        np.asarray(history_ts, dtype=np.int64).reshape(1, -1),
        np.array([request_time], dtype=np.int64),
        items,
    )
    return ids, scores, inputs


def rerank(
    head: CtrHead,
    items: ItemFeatures,
    item_vectors: np.ndarray,
    user_embedding: np.ndarray,
    candidate_ids: np.ndarray,
    retrieval_scores: np.ndarray,
    history_ids: np.ndarray,
    history_ts: np.ndarray,
    request_time: int,
    exclude: np.ndarray | None = None,
) -> Reranked:
    """Retrieved candidates of one request (retrieval order) reordered by the head's logits.

    ``history_ids`` / ``history_ts`` are the request's known events, oldest first; ``exclude``
    holds ids that must not be served (the seen items). Ties keep retrieval order.
    """
    ids, scores, inputs = request_head_inputs(
        items,
        item_vectors,
        user_embedding,
        candidate_ids,
        retrieval_scores,
        history_ids,
        history_ts,
        request_time,
        exclude,
    )
    if len(ids) == 0:
        empty = np.zeros(0, dtype=np.float32)
        return Reranked(ids, empty, empty)
    if head.feature_names is not None and head.feature_names != inputs.feature_names:
        raise ValueError(
            f"the head was trained on features {head.feature_names}, "
            f"the catalogue gives {inputs.feature_names}"
        )
    logits = head.score(inputs.user, inputs.candidates, inputs.features)[0]  # (c,)
    order = np.argsort(-logits, kind="stable")
    return Reranked(ids[order], logits[order], scores[order])

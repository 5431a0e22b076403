"""The server a user would write instead of recserve, on the same bundle: the yardstick of
``bench/serving.py --peer``.

    .venv/bin/python -m bench.plain_peer --models-dir models --bundle perf-1m --port 8100

What a competent engineer writes in an afternoon with FastAPI, onnxruntime and faiss: a
plain ``def`` endpoint (FastAPI runs it in its thread pool), the bundle loaded once at
start, and per request exactly the work recserve does for a cache miss, request by request:
the history's known items ordered by time, the encoder's window (the newest ``max_len``
events with their time gaps), one onnxruntime call, one search of the bundle's index
(``ItemIndex.search``: a plain faiss search of an L2-probed index is wrong, see
docs/ARCHITECTURE.md) as deep as recserve searches, the history's items dropped, and, when
the request is reranked (its ``rerank``, else the bundle's default, as in recserve), the
same CTR head over the same candidate features (``service.ranking.rerank``). No batching,
no cache, no Redis, no history store, no metrics. Native kernels run one thread each, as
recserve's do: with several requests in flight on two cores, more threads per call only
contend.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel, Field

from service.bundle import load_bundle
from service.devices import limit_native_threads
from service.filters import drop_seen
from service.histories import left_padded_window
from service.ranking import RerankJob, rerank
from service.settings import Settings

MODELS_DIR_ENV = "PLAIN_PEER_MODELS_DIR"
BUNDLE_ENV = "PLAIN_PEER_BUNDLE"


class Event(BaseModel):
    item_id: str
    ts: int


class RecommendRequest(BaseModel):
    history: list[Event] = Field(max_length=1000)
    k: int = Field(10, ge=1, le=1000)
    user_id: str | None = None
    rerank: bool | None = None
    at: int | None = None  # unix seconds the head's recency features measure to; None: now


def create_app() -> FastAPI:
    """The peer app over the bundle named by ``PLAIN_PEER_MODELS_DIR`` and
    ``PLAIN_PEER_BUNDLE`` (uvicorn's factory, so that each worker loads its own)."""
    limit_native_threads(1)
    bundle = load_bundle(Path(os.environ[MODELS_DIR_ENV]), os.environ[BUNDLE_ENV], device="cpu")
    retriever = bundle.retrievers[bundle.default_encoder]
    catalogue = bundle.catalogue
    candidates = Settings.model_fields["candidates"].default
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> dict:
        return {"status": "ready"}

    @app.post("/recommend")
    def recommend(request: RecommendRequest) -> dict:
        ids = catalogue.internal_ids([e.item_id for e in request.history])
        stamps = np.array([e.ts for e in request.history], dtype=np.int64)
        order = np.argsort(stamps, kind="stable")
        ids, stamps = ids[order], stamps[order]
        known = ids > 0
        ids, stamps = ids[known], stamps[known]
        if not len(ids):
            return {"items": []}
        window, deltas = left_padded_window(
            ids, stamps, np.array([0]), np.array([len(ids)]), retriever.max_len
        )
        embedding = retriever.encoder.encode(window, deltas)
        seen = np.unique(ids)
        keep = max(candidates, request.k)
        depth = min(keep + len(seen), retriever.index.max_depth)
        scores, found = retriever.index.search(embedding, depth)
        ((kept_ids, kept_scores),) = drop_seen([found[0]], [scores[0]], [seen], [keep])
        wanted = retriever.rerank_default if request.rerank is None else request.rerank
        if wanted and retriever.ctr_head is not None and len(kept_ids):
            ranked = rerank(
                retriever.ctr_head,
                bundle.item_features,
                retriever.item_vectors,
                RerankJob(
                    user_embedding=embedding[0],
                    candidate_ids=kept_ids,
                    retrieval_scores=kept_scores,
                    history_ids=ids,
                    history_ts=stamps,
                    request_time=request.at if request.at is not None else int(time.time()),
                ),
            )
            kept_ids, kept_scores = ranked.ids, ranked.logits
        top = kept_ids[: request.k]
        return {
            "items": [
                {"item_id": str(catalogue.raw_ids[i]), "score": float(s)}
                for i, s in zip(top.tolist(), kept_scores[: request.k].tolist(), strict=True)
            ]
        }

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models-dir", type=Path, required=True)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    os.environ[MODELS_DIR_ENV] = str(args.models_dir.resolve())
    os.environ[BUNDLE_ENV] = args.bundle
    uvicorn.run(
        "bench.plain_peer:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="warning",
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

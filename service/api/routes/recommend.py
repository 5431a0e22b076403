"""POST /recommend."""

from __future__ import annotations

import logging

from fastapi import APIRouter

from service.api.deps import CurrentRecommender, CurrentSettings, State
from service.api.schemas import RecommendRequest, RecommendResponse
from service.errors import NoHistory, StoreUnavailable

LOG = logging.getLogger(__name__)

router = APIRouter(tags=["recommend"])


@router.post("/recommend", response_model=RecommendResponse, response_model_exclude_none=False)
async def recommend(
    body: RecommendRequest,
    state: State,
    recommender: CurrentRecommender,
    settings: CurrentSettings,
) -> RecommendResponse:
    """Top-k items for a history given in the request, or for a user's stored history.

    A history in the request is used as is (and never stored: send events to /events).
    Without one, the user's history is read from Redis; if Redis is down the popularity
    fallback is served and flagged rather than failing the request.
    """
    outage = False
    if body.history is not None:
        events = [(event.item_id, event.ts) for event in body.history]
    else:
        try:
            events = await state.cache.history(body.user_id) if state.cache else []
        except StoreUnavailable:
            state.metrics.errors.labels(kind="redis").inc()
            events, outage = [], True
        if not events and not outage:
            raise NoHistory(f"user {body.user_id!r} has no stored history; send a history")
    result = await recommender.recommend(
        events,
        k=body.k,
        encoder=body.encoder,
        exclude_seen=body.exclude_seen,
        candidates=body.candidates or settings.candidates,
        rerank=body.rerank,
        cache=None if outage else state.cache,
        history_cap=settings.request_history_cap,
    )
    metrics = state.metrics
    metrics.cache.labels(result=result.cache).inc()
    if result.fallback:
        metrics.fallbacks.labels(kind=result.fallback).inc()
    for stage in ("encode", "retrieve", "rerank", "total"):
        metrics.stage.labels(stage=stage).observe(result.timings_ms[stage] / 1000.0)
    return RecommendResponse(
        items=result.items,
        bundle=result.bundle,
        encoder=result.encoder,
        reranked=result.reranked,
        cache=result.cache,
        fallback=result.fallback,
        unknown_items=result.unknown_items,
        history_truncated=result.history_truncated,
        timings_ms=result.timings_ms,
    )

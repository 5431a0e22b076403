"""POST /recommend."""

from __future__ import annotations

import logging
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from pydantic_core import to_json

from service.api.access import Caller, get_caller
from service.api.deps import State
from service.api.lean_route import LeanRoute
from service.api.schemas import RecommendRequest, RecommendResponse
from service.errors import Forbidden, NoHistory, StoreUnavailable, excerpt
from service.experiments import assign

LOG = logging.getLogger(__name__)

# The hot path: FastAPI's per-request handling is replaced by LeanRoute's (see there).
router = APIRouter(tags=["recommend"], route_class=LeanRoute)


@router.post("/recommend", response_model=RecommendResponse)
async def recommend(
    body: RecommendRequest, state: State, caller: Annotated[Caller, Depends(get_caller)]
) -> Response:
    """Top-k items for a history given in the request, or for a user's stored history.

    A history in the request is used as is (and never stored: send events to /events).
    Without one, the user's history is read from Redis; if Redis is down the popularity
    fallback is served and flagged rather than failing the request.

    With an experiment running, the user's arm (``service.experiments``) sets what it
    sets of the retriever, the rerank and the depth. What the answer showed is logged
    behind it (``service.impressions``) under its ``request_id``.
    """
    caller.require("recommend")
    settings = state.settings
    request_id = uuid.uuid4().hex
    assignment = assign(state.experiment, body.user_id or request_id, body.arm)
    arm = assignment.arm
    recommender = state.require_recommender(arm)
    encoder, rerank, candidates = body.encoder, body.rerank, body.candidates
    if arm is not None:
        encoder = arm.encoder or encoder
        rerank = rerank if arm.rerank is None else arm.rerank
        candidates = arm.candidates or candidates
    outage = False
    if body.history is not None:
        events = [(event.item_id, event.ts) for event in body.history]
    else:
        # A stored history is the user's own data: reading it, and answers that may
        # repeat its items, are the caller's to be allowed (docs/RELIABILITY.md).
        caller.require("history:read")
        if settings.stored_history_excludes_seen and not body.exclude_seen:
            raise Forbidden(
                "body.exclude_seen: false is refused on a stored history "
                "(RECSERVE_STORED_HISTORY_EXCLUDES_SEEN)"
            )
        try:
            events = await state.cache.history(body.user_id) if state.cache else []
        except StoreUnavailable:
            state.metrics.errors.labels(kind="redis").inc()
            events, outage = [], True
        if not events and not outage:
            raise NoHistory(f"user {excerpt(body.user_id)} has no stored history; send a history")
    result = await recommender.recommend(
        events,
        k=body.k,
        encoder=encoder,
        exclude_seen=body.exclude_seen,
        candidates=candidates or settings.candidates,
        rerank=rerank,
        cache=None if outage else state.cache,
        history_cap=settings.request_history_cap,
        item_filter=body.filter.item_filter() if body.filter is not None else None,
        at=body.at,
    )
    state.metrics.recommended(result.cache, result.fallback, result.timings_ms)
    # Serialised here, by pydantic-core: validating our own output against the response
    # model on every request would be pure overhead (the model still documents the body in
    # the OpenAPI schema; tests validate real responses against it).
    payload = {
        "items": result.items,
        "bundle": result.bundle,
        "encoder": result.encoder,
        "reranked": result.reranked,
        "cache": result.cache,
        "fallback": result.fallback,
        "unknown_items": result.unknown_items,
        "history_truncated": result.history_truncated,
        "filtered": result.filtered,
        "at": result.at,
        "timings_ms": result.timings_ms,
        "request_id": request_id,
        "experiment": assignment.experiment,
        "arm": assignment.arm_name,
    }
    if state.impressions is not None:
        state.impressions.record(
            request_id=request_id, user=body.user_id, assignment=assignment, answer=payload
        )
    return Response(to_json(payload), media_type="application/json")

"""GET /healthz (the process answers), /readyz (it can serve), /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from service.api.deps import State

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:
    """Liveness: answers while the event loop runs."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: State) -> JSONResponse:
    """Ready when a bundle is loaded; says which, where each of its stages runs, whether
    Redis answers, and the last error."""
    redis_ok = await state.cache.ping() if state.cache else False
    recommender = state.recommender
    body = {
        # Not ready while no compute process answers (replaced after a crash or stall).
        "ready": recommender is not None and recommender.compute.available,
        "bundle": state.bundle_name,
        "encoders": list(recommender.bundle.retrievers) if recommender else [],
        "placement": recommender.compute.placement if recommender else {},
        "redis": "up" if redis_ok else "down",
        "last_error": state.last_error,
    }
    return JSONResponse(body, status_code=200 if body["ready"] else 503)


@router.get("/metrics")
async def metrics(state: State) -> Response:
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

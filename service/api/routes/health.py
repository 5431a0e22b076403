"""GET /healthz (the process answers), /readyz (it can serve), /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from service.api.deps import IsAdmin, MetricsAccess, State
from service.errors import excerpt

router = APIRouter(tags=["health"])
# Included only while RECSERVE_METRICS_ENABLED (service.main); RECSERVE_METRICS_TOKEN
# puts it behind a bearer token of its own.
metrics_router = APIRouter(tags=["health"], dependencies=[MetricsAccess])

LAST_ERROR_CHARS = 2000  # the most of a reload's refusal /readyz repeats, even to the admin


@router.get("/healthz")
async def healthz() -> dict:
    """Liveness: answers while the event loop runs."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: State, admin: IsAdmin) -> JSONResponse:
    """Ready when a bundle is loaded; says which bundle and encoders, whether each
    encoder's CTR head reranks by default and why (``rerank``), whether Redis answers, and
    whether the last reload was refused.

    Where each stage runs (``placement``) and why a reload was refused (``last_error``:
    file paths, a library's message) are shown only to a request with the admin token
    (``Authorization: Bearer``); anyone may ask whether the service is ready.
    """
    redis_ok = await state.cache.ping() if state.cache else False
    recommender = state.recommender
    body = {
        # Not ready while no compute process answers (replaced after a crash or stall).
        "ready": recommender is not None and recommender.compute.available,
        "bundle": state.bundle_name,
        "encoders": list(recommender.bundle.retrievers) if recommender else [],
        "redis": "up" if redis_ok else "down",
        "reload_refused": state.last_error is not None,
        # Per retriever, what a request that does not say rerank gets, and why: the
        # export's gate decided it from numbers, not from anything secret.
        "rerank": {
            name: {"by_default": retriever.rerank_default, "reason": retriever.rerank_reason}
            for name, retriever in recommender.bundle.retrievers.items()
        }
        if recommender
        else {},
    }
    if admin:
        body["placement"] = recommender.compute.placement if recommender else {}
        # The catalogue API's writes this worker serves (docs/ARCHITECTURE.md).
        body["catalogue_version"] = recommender.served.version if recommender else 0
        experiment = state.experiment
        body["experiment"] = (
            {
                "name": experiment.name,
                "arms": {arm.name: round(experiment.share(arm), 6) for arm in experiment.arms},
                "bundles": sorted(state.arm_recommenders),
            }
            if experiment is not None
            else None
        )
        last_error = state.last_error
        if last_error is not None and len(last_error) > LAST_ERROR_CHARS:
            last_error = excerpt(last_error, LAST_ERROR_CHARS, quote=False)
        body["last_error"] = last_error
    return JSONResponse(body, status_code=200 if body["ready"] else 503)


@metrics_router.get("/metrics")
async def metrics(state: State) -> Response:
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

"""The FastAPI application: built by ``create_app``; state lives in the lifespan.

    RECSERVE_DEV_MODE=1 python -m service.serve --port 8000

(service/serve.py starts uvicorn with the HTTP limits of the settings; every start path
uses it.)

The lifespan loads the bundle named by models/CURRENT (the service starts without one and
answers 503 until one appears), connects to Redis, and starts the reload watchers.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service.api.errors import install_error_handlers
from service.api.headers import COMMON_HEADERS, DEMO_HEADERS
from service.api.middleware import RequestBodies, RequestMetrics, SecurityHeaders
from service.api.routes import admin, bundle, demo, events, health, items, recommend
from service.cache import RedisBehaviourCache
from service.errors import BundleError
from service.metrics import Metrics
from service.settings import Settings, get_settings
from service.state import AppState

LOG = logging.getLogger(__name__)

OTEL_OFF = {"tracing": False, "metrics": False, "logs": False}
DOCS_OFF = {"openapi_url": None, "docs_url": None, "redoc_url": None}


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; ``settings`` default to the environment (``RECSERVE_*``)."""
    settings = settings or get_settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        cache = RedisBehaviourCache(
            settings.redis_url,
            settings.key_prefix,
            settings.history_cap,
            settings.cache_ttl_seconds,
            settings.redis_timeout_seconds,
            item_code_cache=settings.item_code_cache,
            wait_replicas=settings.history_wait_replicas,
            wait_ms=settings.history_wait_ms,
        )
        state = AppState(settings, cache, metrics)
        app.state.recserve = state
        try:
            await state.reload()
        except BundleError as exc:
            LOG.error("starting without a bundle: %s", exc)
        # The catalogue API's writes before the first request (Redis down: the follower
        # keeps asking).
        await state.follow_catalogue()
        state.start_background()
        try:
            yield
        finally:
            try:
                await state.stop_background()
                await state.close()
                await cache.close()
            finally:
                metrics.close()  # whatever failed above, this worker's gauges leave

    app = FastAPI(
        title="recserve",
        summary="Sequential recommendations from an exported bundle",
        version="0.1.0",
        lifespan=lifespan,
        # FastAPI's OpenTelemetry instrumentation asks on every request whether a provider
        # is configured; the service reports through Prometheus unless told otherwise.
        telemetry=None if settings.opentelemetry else OTEL_OFF,
        # RECSERVE_DOCS_ENABLED=0: no /docs, /redoc or /openapi.json (404).
        **({} if settings.docs_enabled else DOCS_OFF),
    )
    for module in (recommend, events, items, bundle, health, admin):
        app.include_router(module.router)
    app.include_router(items.writes)
    if settings.metrics_enabled:
        app.include_router(health.metrics_router)
    if settings.demo_enabled:
        demo.install(app)

    install_error_handlers(app, metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"]
        )
    app.add_middleware(RequestBodies, limit=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)
    docs_pages = {app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url} - {None}
    pages = dict.fromkeys(docs_pages, COMMON_HEADERS)
    if settings.demo_enabled:
        pages[demo.PREFIX] = DEMO_HEADERS
    app.add_middleware(SecurityHeaders, pages=pages)
    return app

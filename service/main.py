"""The FastAPI application: built by ``create_app``; state lives in the lifespan.

    RECSERVE_DEV_MODE=1 uvicorn --factory service.main:create_app --port 8000

The lifespan loads the bundle named by models/CURRENT (the service starts without one and
answers 503 until one appears), connects to Redis, and starts the reload watchers.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.routes import admin, events, health, items, recommend
from service.cache import RedisBehaviourCache
from service.errors import BundleError, RequestError, StoreUnavailable
from service.metrics import Metrics
from service.settings import Settings, get_settings
from service.state import AppState, NotReady

LOG = logging.getLogger(__name__)

BODY_PARSE_ERROR = "There was an error parsing the body"  # FastAPI's own wording
OTEL_OFF = {"tracing": False, "metrics": False, "logs": False}


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"body: larger than the limit of {limit} bytes")


class BodySizeLimit:
    """Refuse bodies over ``limit`` bytes, whether announced (Content-Length) or streamed."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            response = JSONResponse({"detail": BodyTooLarge(self.limit).detail}, status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # An HTTPException: FastAPI's body reader re-raises it as the 413 it is.
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited_receive, send)


class RequestMetrics:
    """Count and time requests by route template (not raw path: bounded label values)."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = {"code": 500}

        async def observe(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route=route, status=str(status["code"])).inc()
            self.metrics.latency.labels(route=route).observe(time.perf_counter() - started)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()))
        parts.append(f"{where}: {error.get('msg')}")
    return "; ".join(parts)


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
        )
        state = AppState(settings, cache, metrics)
        app.state.recserve = state
        try:
            await state.reload()
        except BundleError as exc:
            LOG.error("starting without a bundle: %s", exc)
        state.start_background()
        try:
            yield
        finally:
            await state.stop_background()
            await state.close()
            await cache.close()

    app = FastAPI(
        title="recserve",
        summary="Sequential recommendations from an exported bundle",
        version="0.1.0",
        lifespan=lifespan,
        # FastAPI's OpenTelemetry instrumentation asks on every request whether a provider
        # is configured; the service reports through Prometheus unless told otherwise.
        telemetry=None if settings.opentelemetry else OTEL_OFF,
    )
    for module in (recommend, events, items, health, admin):
        app.include_router(module.router)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status_code)

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(request: Request, exc: StoreUnavailable):
        metrics.errors.labels(kind="redis").inc()
        return JSONResponse(
            {"detail": "behaviour store unavailable, retry shortly"},
            status_code=503,
            headers={"Retry-After": "1"},
        )

    @app.exception_handler(NotReady)
    async def not_ready(request: Request, exc: NotReady):
        return JSONResponse(
            {"detail": f"no bundle loaded: {exc}"}, status_code=503, headers={"Retry-After": "5"}
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        metrics.errors.labels(kind="validation").inc()
        # The message names the field; the structured list stays for clients that parse it.
        errors = json.loads(json.dumps(exc.errors(), default=str))
        for error in errors:
            error.pop("input", None)  # never echo what was sent (it may be huge or secret)
            error.pop("ctx", None)
        return JSONResponse({"detail": _validation_message(exc), "errors": errors}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        # FastAPI answers 400 for a body it cannot decode at all (invalid UTF-8, JSON nested
        # past the parser's limit); like any other malformed body that is a 422 on 'body'.
        if exc.status_code == 400 and exc.detail == BODY_PARSE_ERROR:
            metrics.errors.labels(kind="validation").inc()
            return JSONResponse(
                {"detail": "body: not decodable JSON (invalid UTF-8 or nested too deeply)"},
                status_code=422,
            )
        return await http_exception_handler(request, exc)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        metrics.errors.labels(kind="internal").inc()
        LOG.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"]
        )
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app

"""The one place where errors become HTTP answers.

Every exception the service raises on purpose derives from ``service.errors.RecserveError``
and is mapped here; FastAPI's own validation and HTTP errors are reshaped here too, so
every 4xx names the field, and nothing unexpected leaks more than "internal error".
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service.api.headers import SECURITY_HEADERS
from service.errors import (
    EXCERPT_CHARS,
    CatalogueUnavailable,
    ComputeError,
    ComputeUnavailable,
    NotReady,
    ReloadRefused,
    RequestError,
    StoreUnavailable,
    excerpt,
)
from service.metrics import Metrics

LOG = logging.getLogger(__name__)

BODY_PARSE_ERROR = "There was an error parsing the body"  # FastAPI's own wording
# Answers that leave the app past its middleware (a 500 is sent by Starlette's outermost
# layer) carry the security headers themselves.
SECURITY = {name.decode(): value.decode() for name, value in SECURITY_HEADERS}


def error_response(exc: RequestError) -> JSONResponse:
    """The answer to a ``RequestError``, raised in a route or found by the middleware."""
    return JSONResponse({"detail": str(exc)}, status_code=exc.status_code, headers=exc.headers)


def _location_part(part: object) -> object:
    """A part of an error's location: a field name, an index, or (an unexpected key of a
    body) whatever the client sent, which is bounded and escaped."""
    if isinstance(part, str) and (len(part) > EXCERPT_CHARS or not part.isprintable()):
        return excerpt(part)
    return part


def retry_later(detail: str, *, seconds: int) -> JSONResponse:
    """503 with ``Retry-After``: the service cannot answer now but will shortly."""
    return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": str(seconds)})


def brief(exc: Exception) -> str:
    """One log line's worth of an exception: its type and message, bounded (``excerpt``)."""
    return excerpt(f"{type(exc).__name__}: {exc}", quote=False)


def validation_message(exc: RequestValidationError) -> str:
    """``loc: msg`` of every error, joined: the message names each field."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(_location_part(p)) for p in error.get("loc", ()))
        parts.append(f"{where}: {excerpt(error.get('msg'), quote=False)}")
    return "; ".join(parts)


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Map the service's errors (and FastAPI's) to JSON answers on ``app``."""

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        return error_response(exc)

    @app.exception_handler(ReloadRefused)
    async def reload_refused(request: Request, exc: ReloadRefused):
        return JSONResponse({"detail": str(exc), "serving": exc.serving}, status_code=409)

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(request: Request, exc: StoreUnavailable):
        metrics.errors.labels(kind="redis").inc()
        if isinstance(exc, CatalogueUnavailable):
            return retry_later("catalogue store unavailable, nothing was written", seconds=1)
        return retry_later("behaviour store unavailable, retry shortly", seconds=1)

    @app.exception_handler(NotReady)
    async def not_ready(request: Request, exc: NotReady):
        # Why (a path, a library's message) is for the operator: /readyz with the admin token.
        return retry_later("no bundle loaded, retry shortly", seconds=5)

    @app.exception_handler(ComputeUnavailable)
    async def compute_unavailable(request: Request, exc: ComputeUnavailable):
        # The compute process was replaced under this request and its retry failed too:
        # one line for the operator, a retry hint for the client, the connection kept.
        metrics.errors.labels(kind="compute").inc()
        LOG.error("%s %s: %s", request.method, request.url.path, brief(exc))
        return retry_later("compute unavailable, retry shortly", seconds=1)

    @app.exception_handler(ComputeError)
    async def compute_failed(request: Request, exc: ComputeError):
        # This request's computation failed (the compute process serves on): one line, no
        # traceback, nothing internal in the answer.
        metrics.errors.labels(kind="compute").inc()
        LOG.error("%s %s: compute failed: %s", request.method, request.url.path, brief(exc))
        return JSONResponse({"detail": "compute failed for this request"}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        metrics.errors.labels(kind="validation").inc()
        # The message names the field; the structured list stays for clients that parse it.
        errors = json.loads(json.dumps(exc.errors(), default=str))
        for error in errors:
            error.pop("input", None)  # never echo what was sent (it may be huge or secret)
            error.pop("ctx", None)
            error["loc"] = [_location_part(part) for part in error.get("loc", ())]
            error["msg"] = excerpt(error.get("msg"), quote=False)
        return JSONResponse({"detail": validation_message(exc), "errors": errors}, 422)

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

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect):
        # The client left (or the server closed a connection too slow to send its body):
        # nobody reads an answer, and nothing went wrong here.
        metrics.errors.labels(kind="disconnect").inc()
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        metrics.errors.labels(kind="internal").inc()
        LOG.exception("unhandled error on %s %s", request.method, excerpt(request.url.path))
        return JSONResponse({"detail": "internal error"}, status_code=500, headers=SECURITY)

"""ASGI middleware of the app: what a request body must be, security headers on every
answer, and per-route request metrics."""

from __future__ import annotations

import time

from fastapi import HTTPException
from fastapi.responses import JSONResponse

from service.api.errors import error_response
from service.api.headers import SECURITY_HEADERS
from service.errors import UnsupportedMediaType
from service.metrics import Metrics


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"body: larger than the limit of {limit} bytes")


def is_json(content_type: bytes | None) -> bool:
    """``application/json`` or ``application/<anything>+json``, parameters allowed."""
    if content_type is None:
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (
        media.startswith(b"application/") and media.endswith(b"+json")
    )


class RequestBodies:
    """A request that carries a body must declare it JSON (415) and keep it within
    ``limit`` bytes, whether announced (Content-Length) or streamed (413).

    Every body the API takes is JSON. Requiring the declaration, for every route alike,
    means a browser cannot send one from another site without a CORS preflight (a
    ``text/plain`` POST is a "simple" request that needs none), and /recommend and /events
    answer a wrong or missing content type the same way, with a message that says so.
    A request without a body (``POST /admin/reload``) needs no content type.
    """

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        has_body = b"transfer-encoding" in headers or (
            declared is not None and declared.strip(b" 0") != b""
        )
        if has_body and not is_json(headers.get(b"content-type")):
            return await error_response(UnsupportedMediaType())(scope, receive, send)
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


class SecurityHeaders:
    """Add ``SECURITY_HEADERS`` to every answer, except where ``pages`` says otherwise:
    it maps a path, or a prefix ending in "/", to the headers of the pages there (the
    interactive docs need scripts from a CDN, the demo page its own files)."""

    def __init__(self, app, pages: dict[str, tuple[tuple[bytes, bytes], ...]] | None = None):
        self.app = app
        self.exact = dict(pages or {})
        self.prefixes = [(path, headers) for path, headers in self.exact.items() if path[-1] == "/"]

    def headers_for(self, path: str) -> tuple[tuple[bytes, bytes], ...]:
        if path in self.exact:
            return self.exact[path]
        for prefix, headers in self.prefixes:
            if path.startswith(prefix):
                return headers
        return SECURITY_HEADERS

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        extra = self.headers_for(scope["path"])

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


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

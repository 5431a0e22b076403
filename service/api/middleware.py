"""ASGI middleware of the app: the body size limit and per-route request metrics."""

from __future__ import annotations

import time

from fastapi import HTTPException
from fastapi.responses import JSONResponse

from service.metrics import Metrics


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

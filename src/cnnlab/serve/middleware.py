"""The server's two ASGI middlewares: the body-size limit, counted as the bytes arrive, and the Prometheus
request counts and latencies (plain ASGI, so neither adds a task per request)."""

from __future__ import annotations

import time

from fastapi import HTTPException
from fastapi.responses import JSONResponse

# the paths /metrics labels by name; any other is counted as "other", so a scanner cannot grow the label set
KNOWN_PATHS = {"/", "/livez", "/readyz", "/model", "/predict", "/predict/batch", "/explain", "/metrics", "/docs",
               "/openapi.json"}


class BodyLimit:
    """ASGI middleware: 413 once a request body passes `limit` bytes, declared or streamed."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            status = 400 if not length.isdigit() else 413
            detail = "bad Content-Length" if status == 400 else f"body over the {self.limit:,}-byte limit"
            return await JSONResponse({"detail": detail}, status)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"body over the {self.limit:,}-byte limit")
            return message

        await self.app(scope, counted, send)


class Metrics:
    """ASGI middleware: count every answer by path and status, and time it (plain ASGI: no extra task)."""

    def __init__(self, app, requests, latency):
        self.app, self.requests, self.latency = app, requests, latency

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500  # an exception that escapes is a 500

        async def sent(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
            self.requests.labels(path, str(status)).inc()
            self.latency.labels(path).observe(time.perf_counter() - start)

"""The outermost ASGI layer: what is checked before any route reads a byte of the body.

- `Origin`: a browser request from another site is refused (403, or HTTP 403 to a WebSocket
  handshake) unless `allowed_origins` lets it in; the same origin and localhost always may.
  Only state-changing HTTP methods are checked (and every WebSocket), so pages and GETs work.
- API key: with keys configured, /v1/... and /api/... answer 401 before the body is read.
- Body: a JSON (non-multipart) body over `max_json_bytes` is refused with 413 before it is
  parsed; every body must arrive within `body_timeout_s` (408).
- Shutdown: while the server drains, new work is refused with 503 SERVER_SHUTDOWN.
- A client that accepts no audio for `send_timeout_s` (HTTP streaming) ends quietly here.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

from starlette.datastructures import Headers

from ..errors import ForbiddenOrigin, MakimaError, RequestTimeout, RequestTooLarge, ServerShutdown, http_status
from .auth import key_ok, origin_ok
from .errors import error_body

log = logging.getLogger("makima_tts.server")
_SAFE = frozenset({"GET", "HEAD", "OPTIONS"})
_KEYED = ("/v1/", "/api/")
MULTIPART_ROUTES = ("/api/v1/voices",)      # these read their own (larger, streamed) bodies


class ClientTooSlow(Exception):
    """An HTTP client accepted no data for send_timeout_s."""


async def _reply(send, error: MakimaError, status: int = 0, headers: list | None = None) -> None:
    status = status or http_status(error)
    body = json.dumps(error_body(error.code, error.message, status)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    def __init__(self, app, ctx):
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind == "websocket":
            if not origin_ok(self.ctx.settings.allowed_origins, Headers(scope=scope)):
                self.ctx.metrics.errors.labels(ForbiddenOrigin.code).inc()
                await send({"type": "websocket.close", "code": 4403, "reason": "origin not allowed"})
                return
            return await self.app(scope, receive, send)
        if kind != "http":
            return await self.app(scope, receive, send)
        await self._http(scope, receive, send)

    async def _http(self, scope, receive, send):
        s = self.ctx.settings
        headers = Headers(scope=scope)
        method = scope.get("method", "GET")
        path = scope.get("path", "")
        if method not in _SAFE:
            if not origin_ok(s.allowed_origins, headers):
                return await self._refuse(send, ForbiddenOrigin(
                    "cross-site requests are not allowed from this origin; start the server with "
                    "--allowed-origins ORIGIN to allow it"))
            if self.ctx.draining:
                return await self._refuse(send, ServerShutdown("the server is shutting down; retry later"))
        if s.api_keys and path.startswith(_KEYED):
            from urllib.parse import parse_qs

            query = {k: v[0] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()}
            if not key_ok(s.api_keys, headers, query):
                return await _reply(send, MakimaError("invalid or missing API key", code="UNAUTHORIZED"), 401,
                                    [(b"www-authenticate", b"Bearer")])
        if method not in _SAFE:
            multipart = headers.get("content-type", "").lower().startswith("multipart/") \
                or path.rstrip("/") in MULTIPART_ROUTES
            if multipart:
                receive = self._deadline(receive, s.body_timeout_s)
            else:
                try:
                    receive = await self._buffer(headers, receive, s.max_json_bytes, s.body_timeout_s)
                except MakimaError as e:
                    return await self._refuse(send, e)
                except _Disconnected:
                    return
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientTooSlow:
            log.warning("%s %s: the client accepted no data for %g s; its utterance was cancelled",
                        method, path, s.send_timeout_s)
            self.ctx.metrics.errors.labels("SEND_TIMEOUT").inc()
            if not started:  # pragma: no cover - the timeout is on body sends
                raise

    async def _refuse(self, send, error: MakimaError) -> None:
        self.ctx.metrics.errors.labels(error.code).inc()
        await _reply(send, error)

    @staticmethod
    def _deadline(receive, timeout: float):
        deadline = time.monotonic() + timeout

        async def timed():
            left = deadline - time.monotonic()
            try:
                return await asyncio.wait_for(receive(), max(0.0, left))
            except asyncio.TimeoutError:
                raise RequestTimeout(f"the request body did not arrive within {timeout:g} s") from None
        return timed

    @staticmethod
    async def _buffer(headers, receive, limit: int, timeout: float):
        """The whole (small) body, read under the size limit and the deadline; a receive that replays it."""
        too_large = RequestTooLarge(f"the request body is larger than the limit of {limit} bytes")
        declared = headers.get("content-length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    raise too_large
            except ValueError:
                raise RequestTooLarge("invalid Content-Length header") from None
        timed = Guard._deadline(receive, timeout)
        parts, size, more = [], 0, True
        while more:
            message = await timed()
            if message["type"] == "http.disconnect":
                raise _Disconnected()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large
            parts.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(parts), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        return replay


class _Disconnected(Exception):
    pass

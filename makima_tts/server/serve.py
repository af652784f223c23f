"""Running the app under uvicorn: header timeouts, keys kept out of the logs, graceful shutdown.

`make_server(app)` gives a `uvicorn.Server` whose shutdown (SIGTERM, SIGINT) first stops
accepting connections, lets running utterances finish for up to `drain_timeout_s`, then tells
every WebSocket client (`error` SERVER_SHUTDOWN, close 1012) and ends what is left. A watchdog
ends the process if it is still alive a few seconds after that, whatever the clients do.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
from typing import Optional

import uvicorn

log = logging.getLogger("makima_tts.server")
SHUTDOWN_GRACE_S = 3.0          # after the drain: how long uvicorn waits for connections to end
WATCHDOG_EXTRA_S = 5.0          # after drain + grace: the process ends anyway
MAX_HEADER_BYTES = 64 * 1024    # request line and headers together
_SECRET = re.compile(r"((?:^|[?&])api_key=)[^&\s\"]*", re.IGNORECASE)


def redact(text: str) -> str:
    """`?api_key=...` in a path or log line, with the key replaced."""
    return _SECRET.sub(r"\1REDACTED", text)


class RedactKeys(logging.Filter):
    """Keeps API keys passed as `?api_key=` out of uvicorn's access and WebSocket log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        if "api_key=" in message.lower():
            record.msg, record.args = redact(message), None
        return True


def install_log_filters() -> None:
    for name in ("uvicorn.access", "uvicorn.error", "uvicorn"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactKeys) for f in logger.filters):
            logger.addFilter(RedactKeys())


def _http_protocol(header_timeout: float):
    """uvicorn's HTTP protocol with a deadline for the request headers (slow-header clients)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
        done_hook = "on_headers_complete"
    except ImportError:  # pragma: no cover - uvicorn without httptools
        return "auto"

    class TimedHttpProtocol(Base):
        _header_timer: Optional[asyncio.TimerHandle] = None
        _header_bytes = 0

        def _arm(self) -> None:
            self._disarm()
            self._header_bytes = 0
            if header_timeout and header_timeout > 0:
                self._header_timer = self.loop.call_later(header_timeout, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def _count(self, n: int) -> None:
            self._header_bytes += n
            if self._header_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
                self.transport.close()

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value))
            super().on_header(name, value)

    def headers_complete(self) -> None:
        self._disarm()
        getattr(Base, done_hook)(self)

    setattr(TimedHttpProtocol, done_hook, headers_complete)
    return TimedHttpProtocol


class Server(uvicorn.Server):
    """uvicorn.Server with a drain before the shutdown and a watchdog after it."""

    def __init__(self, config: uvicorn.Config, ctx):
        super().__init__(config)
        self.ctx = ctx

    async def shutdown(self, sockets=None) -> None:
        settings = self.ctx.settings
        drain = max(0.0, float(settings.drain_timeout_s))
        watchdog = threading.Timer(drain + SHUTDOWN_GRACE_S + WATCHDOG_EXTRA_S, _force_exit)
        watchdog.daemon = True
        watchdog.start()
        for server in self.servers:        # stop accepting first
            server.close()
        try:
            await self.ctx.drain(drain)
        except Exception:  # pragma: no cover - the shutdown must go on
            log.exception("draining failed")
        await super().shutdown(sockets)


def _force_exit() -> None:
    log.error("shutdown did not complete in time; exiting")
    logging.shutdown()
    os._exit(1)


def make_server(app) -> Server:
    ctx = app.state.ctx
    s = ctx.settings
    config = uvicorn.Config(app, host=s.host, port=s.port, log_level=s.log_level.lower(), ws_max_size=1 << 20,
                            http=_http_protocol(s.header_timeout_s), h11_max_incomplete_event_size=64 * 1024,
                            timeout_graceful_shutdown=int(SHUTDOWN_GRACE_S))
    install_log_filters()
    return Server(config, ctx)

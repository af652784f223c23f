"""The ingress deployment: the server's FastAPI app (protocol, sessions, auth, limits, voices REST) as a
Ray Serve ingress (`@serve.ingress`), behind Serve's HTTP proxy (HTTP and WebSockets).

Its app is the single-process server's (`server.app.create_app`), handed a `RayEngine` (engine.py) that
stands for the `Engine` deployment through a deployment handle; nothing in makima_tts.server knows Ray.
The replica's constructor waits for an engine replica (its name, rate, voices), then Serve builds the app
(`__serve_build_asgi_app__`) and runs its lifespan (generation slots; `--wyoming-port` too). On shutdown
the app first drains as `serve` does on SIGTERM (running utterances get drain_timeout_s, then clients
get SERVER_SHUTDOWN), then closes; `drain()` is the same, asked through a handle.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Any, Optional

from ray import serve

from ..server.settings import Settings
from .engine import INFO_TIMEOUT_S, RayEngine, metrics_collector

log = logging.getLogger("makima_tts.ray")


@serve.ingress()
class Ingress:
    """The body of the `Ingress` deployment (app.py wraps it with serve.deployment and its options)."""

    async def __init__(self, engine_handle: Any, settings: dict):    # type: ignore[misc]  # Serve awaits it
        self.settings = Settings(**settings)
        info = await asyncio.wait_for(_info(engine_handle), INFO_TIMEOUT_S)    # the first engine replica is up
        self.engine = RayEngine.create(engine_handle, info)
        self.fastapi_app: Optional[Any] = None
        log.info("ingress: engine %s (%s) on the Engine deployment; %s utterances at once", self.engine.name,
                 self.engine.model_id, self.settings.streams())

    def __serve_build_asgi_app__(self):
        from ..server.app import create_app

        app = create_app(self.settings, engine=self.engine)
        ctx = app.state.ctx
        ctx.metrics.registry.register(metrics_collector(self.engine))
        inner = app.router.lifespan_context
        drain_s = float(self.settings.drain_timeout_s)

        @asynccontextmanager
        async def lifespan(a):            # the app's own lifespan, with serve's drain before its close
            async with inner(a) as state:
                try:
                    yield state
                finally:
                    await ctx.drain(drain_s)

        app.router.lifespan_context = lifespan
        self.fastapi_app = app
        return app

    async def drain(self, timeout: Optional[float] = None) -> None:
        """Stop taking work, let running utterances finish for up to `timeout` s (drain_timeout_s), then
        tell every client (SERVER_SHUTDOWN) — what `serve` does on SIGTERM, asked before a delete."""
        if self.fastapi_app is not None:
            await self.fastapi_app.state.ctx.drain(float(self.settings.drain_timeout_s if timeout is None else timeout))

    async def status(self) -> dict:
        """GET /ready's body, through a deployment handle (for scripts on the cluster)."""
        if self.fastapi_app is None:
            return {"ready": False}
        out = self.fastapi_app.state.ctx.status()
        out.update(self.engine.cluster_status())
        return out


async def _info(handle) -> dict:
    return await handle.info.remote()

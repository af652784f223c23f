"""The FastAPI app: `create_app(settings)`; `makima-tts serve` runs it under uvicorn."""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from .. import __version__
from ..engine.types import SpeechEngine
from ..errors import MakimaError
from . import routes_openai, routes_ops, routes_page, routes_voices, routes_ws
from .context import ServerContext
from .guard import Guard
from .serve import install_log_filters
from .errors import error_body, makima_error_handler, validation_error_handler
from .settings import Settings

log = logging.getLogger("makima_tts.server")
_HTTP_CODES = {400: "INVALID_MESSAGE", 401: "UNAUTHORIZED", 403: "FORBIDDEN", 404: "NOT_FOUND",
               405: "METHOD_NOT_ALLOWED", 408: "REQUEST_TIMEOUT", 413: "UPLOAD_TOO_LARGE"}


async def _http_error_handler(request, exc: StarletteHTTPException) -> JSONResponse:
    code = _HTTP_CODES.get(exc.status_code, "HTTP_ERROR")
    return JSONResponse(error_body(code, str(exc.detail), exc.status_code), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def _internal_error_handler(request, exc: Exception) -> JSONResponse:
    """A bug: answered without its traceback (the server logs it)."""
    return JSONResponse(error_body("INTERNAL_ERROR", "internal error", 500), status_code=500)


def create_app(settings: Optional[Settings] = None, engine: Optional[SpeechEngine] = None) -> FastAPI:
    settings = settings or Settings()
    ctx = ServerContext(settings, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        install_log_filters()
        await ctx.start()
        wyoming = None
        if settings.wyoming_port:     # Wyoming (Home Assistant): same loop, same speech service
            from .wyoming import WyomingServer

            wyoming = WyomingServer(ctx.speech, settings.host, settings.wyoming_port)
            await wyoming.start()
        try:
            yield
        finally:
            try:
                if wyoming is not None:
                    await wyoming.stop()
            finally:
                ctx.close()

    app = FastAPI(title="makima-tts", version=__version__, lifespan=lifespan,
                  description="Streaming text-to-speech: WebSocket /api/v1/speak, OpenAI-compatible "
                              "/v1/audio/speech, voices. The WebSocket protocol is in docs/protocol.md.")
    app.state.ctx = ctx
    app.add_exception_handler(MakimaError, makima_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
    app.add_exception_handler(Exception, _internal_error_handler)
    app.add_middleware(Guard, ctx=ctx)
    app.include_router(routes_ops.router)
    app.include_router(routes_openai.router)
    app.include_router(routes_ws.router)
    app.include_router(routes_voices.router)
    app.include_router(routes_page.router)
    return app

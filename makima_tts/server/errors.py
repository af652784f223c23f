"""Errors over HTTP: OpenAI's error shape, with our stable code."""
from __future__ import annotations

import math
import re

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ..errors import MakimaError, http_status

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 408: "invalid_request_error",
          409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable_error"}


MAX_MESSAGE_CHARS = 400
_QUOTED = re.compile(r"""(['"])([^'"]{48})[^'"]{16,}\1""")
_PATH = re.compile(r"""(?<![\w/.])/(?:home|root|tmp|usr|opt|var|srv|mnt|media|Users|work|data|private|etc|proc|run|"""
                   r"""nix|snap|Library|Volumes)(?:/[^\s'",;)]*)?""")
_WIN_PATH = re.compile(r"""\b[A-Za-z]:\\[^\s'",;)]*""")


def public_message(message: str) -> str:
    """A message fit to send to a client: no file-system paths, long echoed input cut to a short prefix."""
    message = str(message)
    message = _QUOTED.sub(lambda m: f"{m.group(1)}{m.group(2)}...{m.group(1)}", message)
    message = _PATH.sub("<path>", message)
    message = _WIN_PATH.sub("<path>", message)
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS - 3] + "..."
    return message


def error_body(code: str, message: str, status: int, param: str | None = None) -> dict:
    """{"error": {"message", "type", "param", "code"}} as the OpenAI API sends it."""
    return {"error": {"message": public_message(message), "type": _TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def retry_after_header(exc: Exception) -> dict:
    """`Retry-After` (whole seconds, at least 1) for an error that carries a retry hint (OVERLOADED)."""
    ms = getattr(exc, "retry_after_ms", None)
    if not isinstance(ms, (int, float)) or ms < 0:
        return {}
    return {"Retry-After": str(max(1, math.ceil(ms / 1000.0)))}


def error_response(exc: Exception, status: int | None = None) -> JSONResponse:
    if isinstance(exc, MakimaError):
        status = status or http_status(exc)
        return JSONResponse(error_body(exc.code, exc.message, status), status_code=status,
                            headers=retry_after_header(exc) or None)
    status = status or 500
    return JSONResponse(error_body("INTERNAL_ERROR", "internal error", status), status_code=status)


async def makima_error_handler(request: Request, exc: MakimaError) -> JSONResponse:
    request.app.state.ctx.metrics.errors.labels(exc.code).inc()
    return error_response(exc)


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    where = public_message(".".join(str(p)[:64] for p in first.get("loc", ()) if p != "body"))
    message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
    return JSONResponse(error_body("INVALID_MESSAGE", message, 400, param=where or None), status_code=400)

"""Optional API keys: `Authorization: Bearer KEY`, or `?api_key=KEY` for browsers."""
from __future__ import annotations

import hmac
from typing import Optional
from urllib.parse import urlsplit

from fastapi import HTTPException, Request


def _presented_key(headers, query_params) -> Optional[str]:
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return query_params.get("api_key")


def key_ok(keys: list[str], headers, query_params) -> bool:
    if not keys:
        return True
    presented = _presented_key(headers, query_params)
    if not presented:
        return False
    return any(hmac.compare_digest(presented.encode(), k.encode()) for k in keys)


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: 401 in OpenAI's error shape when keys are configured and none matches."""
    if not key_ok(request.app.state.ctx.settings.api_keys, request.headers, request.query_params):
        raise HTTPException(status_code=401, detail="invalid or missing API key")


_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


def _netloc(scheme: str, host: str, port: Optional[int]) -> str:
    port_s = "" if port is None or str(port) == _DEFAULT_PORTS.get(scheme) else f":{port}"
    return f"{host}{port_s}"


def origin_ok(allowed: list[str], headers) -> bool:
    """Whether a request may come from its `Origin`: none (not a browser), the same origin (its host
    is the request's Host), a localhost origin, or one of `allowed` ('*' allows any)."""
    origin = headers.get("origin")
    if origin is None:
        return True
    origin = origin.strip().rstrip("/").lower()
    allowed_set = {a.strip().rstrip("/").lower() for a in allowed}
    if "*" in allowed_set or origin in allowed_set:
        return True
    try:
        parts = urlsplit(origin)
        host, port = parts.hostname, parts.port
    except ValueError:
        return False
    if not host or parts.scheme not in ("http", "https"):
        return False
    if host in _LOCAL_HOSTS or host.endswith(".localhost"):
        return True
    request_host = headers.get("host", "").strip().lower()
    if not request_host:
        return False
    try:
        req = urlsplit(f"{parts.scheme}://{request_host}")
        return _netloc(parts.scheme, host, port) == _netloc(parts.scheme, req.hostname or "", req.port)
    except ValueError:
        return False

"""Optional API keys: `Authorization: Bearer KEY`, or `?api_key=KEY` for browsers."""
from __future__ import annotations

import hmac
from typing import Optional

from fastapi import HTTPException, Request
from starlette.websockets import WebSocket


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


def websocket_key_ok(ws: WebSocket) -> bool:
    return key_ok(ws.app.state.ctx.settings.api_keys, ws.headers, ws.query_params)

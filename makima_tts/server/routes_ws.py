"""WebSocket /api/v1/speak."""
from __future__ import annotations

from fastapi import APIRouter, WebSocket

from .session import Session

router = APIRouter()


@router.websocket("/api/v1/speak")
async def speak(ws: WebSocket) -> None:
    await Session(ws).run()

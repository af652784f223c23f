"""WebSocket /api/v1/speak: a Session built with the speech service it speaks through."""
from __future__ import annotations

from fastapi import APIRouter, WebSocket

from .deps import Speech
from .session import Session

router = APIRouter()


@router.websocket("/api/v1/speak")
async def speak(ws: WebSocket, service: Speech) -> None:
    await Session(ws, service).run()

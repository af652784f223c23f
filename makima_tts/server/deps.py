"""What route handlers are handed (FastAPI dependencies): the app's parts, by type.

    async def handler(..., service: Speech): ...      # the app's SpeechService
"""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from .speech import SpeechService


def speech_service(conn: HTTPConnection) -> SpeechService:
    """The SpeechService of the app serving this request or WebSocket (built by create_app)."""
    return conn.app.state.ctx.speech


Speech = Annotated[SpeechService, Depends(speech_service)]

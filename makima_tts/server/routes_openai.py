"""OpenAI-compatible POST /v1/audio/speech: the body streams while the audio is generated."""
from __future__ import annotations

import asyncio
import base64
import json
from typing import Annotated, Literal, Optional, Union

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..audio import CONTENT_TYPES, G711_FORMATS, make_encoder
from ..errors import MakimaError, UnsupportedFormat
from .auth import require_api_key
from .deps import Speech
from .guard import ClientTooSlow
from .stream import SAMPLE_RATES, UtteranceStats

router = APIRouter()
OUT_RATE = 24000


class VoiceRef(BaseModel):
    id: str = Field(..., max_length=128)


class TimedStreamingResponse(StreamingResponse):
    """A streamed body whose every send must complete within `send_timeout` s: a client that accepts
    nothing for that long ends the response, and closing the body cancels its utterance (slot freed)."""

    def __init__(self, content, *, send_timeout: float, **kw):
        super().__init__(content, **kw)
        self.send_timeout = send_timeout if send_timeout and send_timeout > 0 else None

    async def stream_response(self, send) -> None:
        async def timed(message) -> None:
            try:
                await asyncio.wait_for(send(message), self.send_timeout)
            except asyncio.TimeoutError:
                raise ClientTooSlow() from None
        try:
            await super().stream_response(timed)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


class SpeechRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field("makima-tts", description="any value; the server speaks with its loaded model")
    input: str = Field(..., description="the text to speak")
    voice: Union[Annotated[str, Field(max_length=128)], VoiceRef, None] = Field(None, description="a voice id from /api/v1/voices; OpenAI's "
                                                                "names (alloy, ...) mean the default voice")
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm", "mulaw", "alaw"] = Field(
        "mp3", description="mulaw / alaw: raw G.711, 8 kHz unless sample_rate is given")
    sample_rate: Optional[int] = Field(None, description="makima-tts extension: output rate, one of "
                                       + ", ".join(map(str, SAMPLE_RATES)) + " (default 24000; mulaw / alaw 8000)")
    speed: float = Field(1.0, ge=0.25, le=4.0, description="tempo; the pitch is kept")
    stream_format: Literal["audio", "sse"] = "audio"
    instructions: Optional[str] = Field(None, description="accepted and ignored")
    language: Optional[str] = Field(None, max_length=64, description="makima-tts extension: auto or one of the ten languages")
    seed: Optional[int] = Field(None, description="makima-tts extension: seed for reproducible sampling")


@router.post("/v1/audio/speech", tags=["openai"], dependencies=[Depends(require_api_key)],
             response_class=StreamingResponse,
             responses={200: {"content": {ct: {} for ct in CONTENT_TYPES.values()}}})
async def speech(body: SpeechRequest, service: Speech):
    text = service.check_text(body.input)
    await service.engines.get(wait=service.settings.lazy_load)
    voice = body.voice.id if isinstance(body.voice, VoiceRef) else body.voice
    fmt = body.response_format
    rate = body.sample_rate or (8000 if fmt in G711_FORMATS else OUT_RATE)
    if rate not in SAMPLE_RATES:
        raise UnsupportedFormat(f"sample_rate {rate} is not supported; use one of {', '.join(map(str, SAMPLE_RATES))}")
    encoder = make_encoder(fmt, rate)
    stats = UtteranceStats()
    audio = service.speak(text, voice=voice, language=body.language or "auto", out_rate=rate, speed=body.speed,
                          sampling=None if body.seed is None else {"seed": body.seed}, stats=stats)
    try:   # the first chunk before the status line: errors get their status code
        first = await audio.__anext__()
    except StopAsyncIteration:
        first = None
    except BaseException:
        await audio.aclose()
        raise                  # a MakimaError is counted and answered by the app's error handler

    async def encoded():
        outcome = "cancelled"
        try:
            if first is not None:
                yield encoder.encode(first)
            async for pcm in audio:
                data = encoder.encode(pcm)
                if data:
                    yield data
            yield encoder.finish()
            outcome = "ok"
        except MakimaError as e:
            outcome = "error"
            service.metrics.errors.labels(e.code).inc()
            raise
        finally:
            await audio.aclose()
            service.metrics.utterance(service.engines.name, outcome, stats)

    async def sse():
        n = 0
        inner = encoded()
        try:
            async for data in inner:
                if data:
                    n += len(data)
                    event = {"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()}
                    yield f"data: {json.dumps(event)}\n\n".encode()
        finally:
            await inner.aclose()
        done = {"type": "speech.audio.done",
                "usage": {"input_tokens": len(text), "output_tokens": n, "total_tokens": len(text) + n}}
        yield f"data: {json.dumps(done)}\n\n".encode()

    headers = {"X-Voice": str(stats.voice or ""), "Cache-Control": "no-store"}
    timeout = service.settings.send_timeout_s
    if body.stream_format == "sse":
        return TimedStreamingResponse(sse(), media_type="text/event-stream", headers=headers, send_timeout=timeout)
    media_type = f"{CONTENT_TYPES[fmt]};rate={rate}" if fmt in G711_FORMATS else CONTENT_TYPES[fmt]
    return TimedStreamingResponse(encoded(), media_type=media_type, headers=headers, send_timeout=timeout)


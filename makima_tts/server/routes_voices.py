"""REST for the voice library: /api/v1/voices. Thin: parse the request, call the VoiceService
(makima_tts.voices.service: the built-in guard, prompt invalidation, rollback), answer its models.

GET    /api/v1/voices              list (?limit=&offset=), the engine's built-in voices first
POST   /api/v1/voices              multipart: file, voice_id?, name?, transcript?, language?, x_vector_only?
GET    /api/v1/voices/{id}         one voice
GET    /api/v1/voices/{id}/audio   its reference clip (FLAC, 24 kHz mono)
PATCH  /api/v1/voices/{id}         JSON {"name"?, "transcript"?}; the prompt is recomputed
DELETE /api/v1/voices/{id}         remove (built-in voices cannot be removed)
"""
from __future__ import annotations

from typing import AsyncGenerator, Optional

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ..errors import InvalidAudio, InvalidInput, MakimaError, UploadTooLarge
from ..voices import VoiceDeleted, VoiceList, VoiceOut, VoicePatch, VoiceService
from .auth import require_api_key
from .errors import error_response

router = APIRouter()
PREFIX = "/api/v1/voices"
_AUTH = [Depends(require_api_key)]
# Room for the multipart framing and the text fields on top of the file itself.
_FORM_OVERHEAD = 64 * 1024
_READ_PIECE = 256 * 1024


class _TooLarge(Exception):
    pass


def _voices(request: Request) -> VoiceService:
    return request.app.state.ctx.voices


@router.get(PREFIX, dependencies=_AUTH, response_model=VoiceList)
async def list_voices(request: Request, limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)):
    return await run_in_threadpool(_voices(request).list, limit, offset)


def _truthy(value: Optional[str]) -> bool:
    if value is None:
        return False
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("", "0", "false", "no", "off"):
        return False
    raise InvalidInput(f"x_vector_only must be true or false, got {value!r}")


def _field(form, name: str) -> Optional[str]:
    value = form.get(name)
    if value is None or not isinstance(value, str):
        return None
    return value


async def _parse_form(request: Request, limit: int):
    """The multipart form, reading the body piece by piece and stopping once it passes the limit."""
    from starlette.formparsers import MultiPartParser

    async def body() -> AsyncGenerator[bytes, None]:
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit + _FORM_OVERHEAD:
                raise _TooLarge()
            yield chunk

    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise InvalidInput("send the clip as multipart/form-data with a `file` field")
    parser = MultiPartParser(request.headers, body(), max_files=2, max_fields=20)
    try:
        return await parser.parse()
    except _TooLarge:
        raise
    except MakimaError:
        raise
    except Exception as e:
        raise InvalidInput(f"malformed multipart body: {e}") from None


async def _read_upload(upload, limit: int) -> bytes:
    parts, size = [], 0
    while True:
        piece = await upload.read(_READ_PIECE)
        if not piece:
            break
        size += len(piece)
        if size > limit:
            raise _TooLarge()
        parts.append(piece)
    return b"".join(parts)


def _too_large(limit: int) -> JSONResponse:
    return error_response(UploadTooLarge(f"the upload is larger than the limit of {limit} bytes "
                                         f"({limit / 1048576:.1f} MiB); send a 3-10 s clip"), 413)


@router.post(PREFIX, dependencies=_AUTH, status_code=201, response_model=VoiceOut)
async def create_voice(request: Request):
    voices = _voices(request)
    limit = int(request.app.state.ctx.settings.max_upload_bytes)
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_n = int(declared)
        except ValueError:
            raise InvalidInput("invalid Content-Length header") from None
        if declared_n > limit + _FORM_OVERHEAD:
            return _too_large(limit)
    try:
        form = await _parse_form(request, limit)
    except _TooLarge:
        return _too_large(limit)
    try:
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise InvalidAudio("no audio: send the reference clip in the `file` field")
        try:
            data = await _read_upload(upload, limit)
        except _TooLarge:
            return _too_large(limit)
        if not data:
            raise InvalidAudio("the uploaded file is empty (0 bytes)")
        name = _field(form, "name")
        filename = getattr(upload, "filename", None) or None
        voice_id = voices.new_voice_id(_field(form, "voice_id"), name, filename)
        x_vector_only = _truthy(_field(form, "x_vector_only"))
        language = _field(form, "language") or "auto"
        transcript = _field(form, "transcript")
    finally:
        await form.close()
    return await run_in_threadpool(voices.create, voice_id, data, filename=filename, name=name,
                                   transcript=transcript, language=language, x_vector_only=x_vector_only)


@router.get(PREFIX + "/{voice_id}", dependencies=_AUTH, response_model=VoiceOut)
async def get_voice(request: Request, voice_id: str):
    return await run_in_threadpool(_voices(request).get, voice_id)


@router.get(PREFIX + "/{voice_id}/audio", dependencies=_AUTH)
async def get_voice_audio(request: Request, voice_id: str):
    data = await run_in_threadpool(_voices(request).clip, voice_id)
    return Response(data, media_type="audio/flac",
                    headers={"Content-Disposition": f'attachment; filename="{voice_id}.flac"'})


@router.patch(PREFIX + "/{voice_id}", dependencies=_AUTH, response_model=VoiceOut)
async def patch_voice(request: Request, voice_id: str, patch: VoicePatch):
    return await run_in_threadpool(_voices(request).update, voice_id, name=patch.name, transcript=patch.transcript)


@router.delete(PREFIX + "/{voice_id}", dependencies=_AUTH, response_model=VoiceDeleted)
async def delete_voice(request: Request, voice_id: str):
    return await run_in_threadpool(_voices(request).delete, voice_id)

"""REST for the voice library: /api/v1/voices.

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
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from ..errors import BuiltinVoice, InvalidAudio, InvalidInput, InvalidVoiceId, MakimaError, UploadTooLarge
from ..voices import VoiceLibrary, slugify, validate_id
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


def _ctx(request: Request):
    return request.app.state.ctx


def _builtin(ctx) -> list:
    engine = getattr(ctx, "engine", None)
    if engine is None:
        return []
    try:
        return list(engine.builtin_voices())
    except Exception:
        return []


def _builtin_json(info) -> dict:
    return {"voice_id": info.voice_id, "name": info.name, "language": info.language, "transcript": None,
            "x_vector_only": False, "duration_s": None, "sample_rate": None, "created": None, "hash": None,
            "builtin": True, "generated": False, "license": None, "has_audio": False,
            "description": getattr(info, "description", "")}


def _find_builtin(ctx, voice_id: str):
    for info in _builtin(ctx):
        if info.voice_id == voice_id:
            return info
    return None


def _default_voice(ctx):
    info = getattr(ctx, "default_voice_info", None)
    if callable(info):
        try:
            return info()
        except Exception:
            pass
    return getattr(getattr(ctx, "settings", None), "default_voice", None)


def _can_clone(ctx) -> bool:
    engine = getattr(ctx, "engine", None)
    return engine is not None and bool(getattr(engine, "supports_cloning", False)) \
        and getattr(ctx, "prompts", None) is not None


@router.get(PREFIX, dependencies=_AUTH)
async def list_voices(request: Request, limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)):
    ctx = _ctx(request)
    library: VoiceLibrary = ctx.library
    records = await run_in_threadpool(library.list)
    voices = [_builtin_json(v) for v in _builtin(ctx)] + [r.to_json() for r in records]
    return {"voices": voices[offset:offset + limit], "total": len(voices), "limit": limit, "offset": offset,
            "default_voice": _default_voice(ctx)}


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


@router.post(PREFIX, dependencies=_AUTH, status_code=201)
async def create_voice(request: Request):
    ctx = _ctx(request)
    library: VoiceLibrary = ctx.library
    limit = int(ctx.settings.max_upload_bytes)
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
        voice_id = (_field(form, "voice_id") or "").strip()
        if not voice_id:
            voice_id = slugify(name or "") or slugify((filename or "").rsplit(".", 1)[0])
            if not voice_id:
                raise InvalidVoiceId("give a voice_id (a-z, 0-9, '_', '-') or a name to make one from")
        validate_id(voice_id)
        if _find_builtin(ctx, voice_id) is not None:
            raise BuiltinVoice(f"{voice_id!r} is a built-in voice of the {ctx.engine.name} engine; pick another id")
        x_vector_only = _truthy(_field(form, "x_vector_only"))
        language = _field(form, "language") or "auto"
        transcript = _field(form, "transcript")
    finally:
        await form.close()

    record = await run_in_threadpool(library.add_file, voice_id, data, source_name=filename, name=name,
                                     transcript=transcript, language=language, x_vector_only=x_vector_only)
    warnings = [record.warning] if record.warning else []
    if _can_clone(ctx):
        # Compute the prompt now, so a clip the engine cannot use fails this request, not a later one.
        try:
            await run_in_threadpool(ctx.prompts.get, voice_id)
        except BaseException:
            await run_in_threadpool(_remove_quietly, library, ctx, voice_id)
            raise
    elif getattr(ctx, "engine", None) is not None:
        warnings.append(f"the {ctx.engine.name} engine serving now cannot clone voices; this voice is stored and "
                        "will be used once the server runs with a Qwen3-TTS checkpoint")
    out = record.to_json()
    if warnings:
        out["warning"] = "; ".join(warnings)
    return JSONResponse(out, status_code=201)


def _remove_quietly(library: VoiceLibrary, ctx, voice_id: str) -> None:
    try:
        library.remove(voice_id)
    except MakimaError:
        pass
    prompts = getattr(ctx, "prompts", None)
    if prompts is not None:
        prompts.invalidate(voice_id)


@router.get(PREFIX + "/{voice_id}", dependencies=_AUTH)
async def get_voice(request: Request, voice_id: str):
    ctx = _ctx(request)
    validate_id(voice_id)
    info = _find_builtin(ctx, voice_id)
    if info is not None:
        return _builtin_json(info)
    record = await run_in_threadpool(ctx.library.get, voice_id)
    return record.to_json()


@router.get(PREFIX + "/{voice_id}/audio", dependencies=_AUTH)
async def get_voice_audio(request: Request, voice_id: str):
    ctx = _ctx(request)
    validate_id(voice_id)
    if _find_builtin(ctx, voice_id) is not None:
        from ..errors import VoiceNotFound

        raise VoiceNotFound(f"{voice_id!r} is a built-in voice: it has no reference clip")
    data = await run_in_threadpool(_read_clip, ctx.library, voice_id)
    return Response(data, media_type="audio/flac",
                    headers={"Content-Disposition": f'attachment; filename="{voice_id}.flac"'})


def _read_clip(library: VoiceLibrary, voice_id: str) -> bytes:
    """The clip's bytes, read at once: a voice removed meanwhile is a 404, never a 500 or an empty body."""
    from ..errors import VoiceNotFound

    path = library.audio_path(voice_id)
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise VoiceNotFound(f"voice {voice_id!r} not found (it was removed)") from None


class VoicePatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Optional[str] = None
    transcript: Optional[str] = None


@router.patch(PREFIX + "/{voice_id}", dependencies=_AUTH)
async def patch_voice(request: Request, voice_id: str, patch: VoicePatch):
    ctx = _ctx(request)
    validate_id(voice_id)
    if _find_builtin(ctx, voice_id) is not None:
        raise BuiltinVoice(f"{voice_id!r} is a built-in voice of the {ctx.engine.name} engine: it cannot be edited")
    record = await run_in_threadpool(ctx.library.update, voice_id, name=patch.name, transcript=patch.transcript)
    prompts = getattr(ctx, "prompts", None)
    if prompts is not None:
        prompts.invalidate(voice_id)
        if _can_clone(ctx) and patch.transcript is not None:
            await run_in_threadpool(prompts.get, voice_id)
    return record.to_json()


@router.delete(PREFIX + "/{voice_id}", dependencies=_AUTH)
async def delete_voice(request: Request, voice_id: str):
    ctx = _ctx(request)
    validate_id(voice_id)
    if _find_builtin(ctx, voice_id) is not None:
        raise BuiltinVoice(f"{voice_id!r} is a built-in voice of the {ctx.engine.name} engine: it cannot be removed")
    await run_in_threadpool(ctx.library.remove, voice_id)
    prompts = getattr(ctx, "prompts", None)
    if prompts is not None:
        prompts.invalidate(voice_id)
    return {"voice_id": voice_id, "object": "voice", "deleted": True}

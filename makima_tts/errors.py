"""Errors as named exceptions, each with a stable code that clients can rely on."""
from __future__ import annotations


class MakimaError(Exception):
    """Base class. `code` is stable (it appears in the protocol); the message is for people."""

    code = "INTERNAL_ERROR"
    recoverable = True

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class InvalidInput(MakimaError):
    code = "INVALID_MESSAGE"


class EmptyText(InvalidInput):
    code = "EMPTY_TEXT"


class TextTooLong(InvalidInput):
    code = "TEXT_TOO_LONG"


class UnknownLanguage(InvalidInput):
    code = "UNSUPPORTED_LANGUAGE"


class UnsupportedFormat(InvalidInput):
    code = "UNSUPPORTED_FORMAT"


class InvalidAudio(InvalidInput):
    """A reference clip that cannot be read, or is too short, silent or clipped."""

    code = "INVALID_AUDIO"


class VoiceNotFound(MakimaError):
    code = "VOICE_NOT_FOUND"


class CheckpointError(MakimaError):
    """A checkpoint that is missing, incomplete, corrupt or unreachable."""

    code = "CHECKPOINT_ERROR"
    recoverable = False


class EngineUnavailable(MakimaError):
    code = "TTS_UNAVAILABLE"
    recoverable = False


class SynthesisError(MakimaError):
    code = "SYNTHESIS_ERROR"


class CloningUnsupported(EngineUnavailable):
    """The engine in use cannot clone voices (Piper). Same code as EngineUnavailable, but the
    session can go on with the built-in voices, so it is recoverable."""

    recoverable = True


class InvalidVoiceId(InvalidInput):
    """A voice id with path separators, `..`, unsafe characters or too long."""

    code = "INVALID_VOICE_ID"


class VoiceExists(MakimaError):
    """A voice with this id exists already, or another upload of it is in progress."""

    code = "VOICE_EXISTS"


class NotReady(MakimaError):
    """The model is still loading."""

    code = "TTS_NOT_READY"


class Overloaded(MakimaError):
    """Every generation slot is busy and the wait queue is full (or a session's own queue is).
    `retry_after_ms`: the server's estimate of when to retry (WebSocket `retry_after_ms`, HTTP
    `Retry-After` in whole seconds)."""

    code = "OVERLOADED"
    DEFAULT_RETRY_AFTER_MS = 1000

    def __init__(self, message: str, *, code: str | None = None, retry_after_ms: int | None = None):
        super().__init__(message, code=code)
        self.retry_after_ms = int(self.DEFAULT_RETRY_AFTER_MS if retry_after_ms is None else retry_after_ms)


class SendTimeout(MakimaError):
    """The client accepted no audio for send_timeout_s: its utterance was cancelled and its slot freed."""

    code = "SEND_TIMEOUT"


class ServerShutdown(MakimaError):
    """The server is shutting down (SIGTERM); reconnect, to this server once it is back or to another."""

    code = "SERVER_SHUTDOWN"


class ForbiddenOrigin(MakimaError):
    """A browser request from a site that is not allowed (`allowed_origins`)."""

    code = "FORBIDDEN_ORIGIN"


class RequestTooLarge(InvalidInput):
    """A request body over max_json_bytes."""

    code = "REQUEST_TOO_LARGE"


class RequestTimeout(InvalidInput):
    """A request body that did not arrive within body_timeout_s."""

    code = "REQUEST_TIMEOUT"


class SessionTimeout(MakimaError):
    code = "SESSION_TIMEOUT"
    recoverable = False


class UploadTooLarge(InvalidInput):
    """An upload over max_upload_bytes."""

    code = "UPLOAD_TOO_LARGE"


class BuiltinVoice(InvalidInput):
    """A built-in voice of the engine: it cannot be edited or removed."""

    code = "VOICE_BUILTIN"


# HTTP status for each error class (most specific first).
HTTP_STATUS: list[tuple[type, int]] = [
    (Overloaded, 429), (NotReady, 503), (ServerShutdown, 503), (ForbiddenOrigin, 403), (RequestTooLarge, 413),
    (RequestTimeout, 408), (SendTimeout, 408), (CloningUnsupported, 400), (EngineUnavailable, 503),
    (VoiceExists, 409), (VoiceNotFound, 404), (TextTooLong, 413), (UploadTooLarge, 413), (InvalidInput, 400),
    (CheckpointError, 503), (SynthesisError, 500), (MakimaError, 500),
]


def http_status(error: Exception) -> int:
    for cls, status in HTTP_STATUS:
        if isinstance(error, cls):
            return status
    return 500

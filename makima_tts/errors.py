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

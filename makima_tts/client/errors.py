"""Typed errors of the client: one class per protocol error code (docs/protocol.md), and the
client's own (connection, timeouts, circuit breaker). Each carries the server's message.

Every class derives from `ClientError`, itself a `makima_tts.errors.MakimaError` (so `code`,
`message` and `recoverable` are there, and the CLI prints `error [CODE]: message`); the classes
that mirror a server error also derive from the server's class of the same code, so
`except makima_tts.errors.VoiceNotFound` catches both.
"""
from __future__ import annotations

from typing import Optional

from .. import errors as _server_errors
from ..errors import MakimaError


class ClientError(MakimaError):
    """Base of everything the client raises.

    `utterance_id`: the utterance it concerns, when one does; `status`: the HTTP status, for
    HTTP calls; `retry_after`: seconds the server (or the breaker) asks to wait, when known."""

    code = "CLIENT_ERROR"
    #: Whether the circuit breaker counts it as a failure of the server.
    counts_as_failure = False

    def __init__(self, message: str, *, code: Optional[str] = None, recoverable: Optional[bool] = None,
                 utterance_id: Optional[str] = None, status: Optional[int] = None,
                 retry_after: Optional[float] = None):
        super().__init__(message, code=code)
        if recoverable is not None:
            self.recoverable = recoverable
        self.utterance_id = utterance_id
        self.status = status
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


# --------------------------------------------------------------------- the server's codes


class ServerError(ClientError):
    """An `error` message (or HTTP error body) from the server; subclasses per code."""

    code = "INTERNAL_ERROR"


class InvalidMessage(ServerError, _server_errors.InvalidInput):
    code = "INVALID_MESSAGE"


class EmptyText(InvalidMessage, _server_errors.EmptyText):
    code = "EMPTY_TEXT"


class TextTooLong(InvalidMessage, _server_errors.TextTooLong):
    code = "TEXT_TOO_LONG"


class UnsupportedFormat(InvalidMessage, _server_errors.UnsupportedFormat):
    code = "UNSUPPORTED_FORMAT"


class UnsupportedLanguage(InvalidMessage, _server_errors.UnknownLanguage):
    code = "UNSUPPORTED_LANGUAGE"


class InvalidAudio(InvalidMessage, _server_errors.InvalidAudio):
    code = "INVALID_AUDIO"


class InvalidVoiceId(InvalidMessage, _server_errors.InvalidVoiceId):
    code = "INVALID_VOICE_ID"


class UploadTooLarge(InvalidMessage, _server_errors.UploadTooLarge):
    code = "UPLOAD_TOO_LARGE"


class VoiceBuiltin(InvalidMessage, _server_errors.BuiltinVoice):
    code = "VOICE_BUILTIN"


class VoiceNotFound(ServerError, _server_errors.VoiceNotFound):
    code = "VOICE_NOT_FOUND"


class VoiceExists(ServerError, _server_errors.VoiceExists):
    code = "VOICE_EXISTS"


class TTSNotReady(ServerError, _server_errors.NotReady):
    code = "TTS_NOT_READY"
    counts_as_failure = True


class TTSUnavailable(ServerError, _server_errors.EngineUnavailable):
    code = "TTS_UNAVAILABLE"
    counts_as_failure = True


class SynthesisError(ServerError, _server_errors.SynthesisError):
    code = "SYNTHESIS_ERROR"
    counts_as_failure = True


class Overloaded(ServerError, _server_errors.Overloaded):
    """Every generation slot of the server is busy. `retry_after`: the server's hint (seconds)
    when it sent one, else the client's `overload_retry_s`."""

    code = "OVERLOADED"
    counts_as_failure = True


class SessionTimeout(ServerError, _server_errors.SessionTimeout):
    code = "SESSION_TIMEOUT"


class RequestTooLarge(InvalidMessage):
    code = "REQUEST_TOO_LARGE"


class RequestTimeout(InvalidMessage):
    code = "REQUEST_TIMEOUT"


class SendTimeout(ServerError):
    """The server cancelled an utterance whose audio this client did not read in time."""

    code = "SEND_TIMEOUT"


class ServerShutdown(ServerError):
    """The server is shutting down; the next call reconnects (to it once it is back)."""

    code = "SERVER_SHUTDOWN"
    counts_as_failure = True


class ForbiddenOrigin(ServerError):
    code = "FORBIDDEN_ORIGIN"


class Unauthorized(ServerError):
    """A bad or missing API key (HTTP 401, WebSocket close 4401)."""

    code = "UNAUTHORIZED"
    recoverable = False


_BY_CODE = {cls.code: cls for cls in (
    InvalidMessage, EmptyText, TextTooLong, UnsupportedFormat, UnsupportedLanguage, InvalidAudio, InvalidVoiceId,
    UploadTooLarge, VoiceBuiltin, VoiceNotFound, VoiceExists, TTSNotReady, TTSUnavailable, SynthesisError,
    Overloaded, SessionTimeout, Unauthorized, RequestTooLarge, RequestTimeout, SendTimeout, ServerShutdown,
    ForbiddenOrigin)}


def error_for(code: str, message: str, **kw) -> ServerError:
    """The typed exception for a protocol error code (`ServerError` for a code this client does not know)."""
    cls = _BY_CODE.get(code, ServerError)
    return cls(message, code=code, **kw)


def from_message(msg: dict) -> ServerError:
    """From a WebSocket `error` message. A retry hint is read from `retry_after_ms` or
    `retry_after` (seconds) when the server sends one."""
    retry = msg.get("retry_after_ms")
    retry = retry / 1000.0 if isinstance(retry, (int, float)) else msg.get("retry_after")
    return error_for(str(msg.get("code") or "INTERNAL_ERROR"), str(msg.get("message") or "error from the server"),
                     recoverable=msg.get("recoverable"), utterance_id=msg.get("id"),
                     retry_after=float(retry) if isinstance(retry, (int, float)) else None)


# --------------------------------------------------------------------- the client's own


class ConnectError(ClientError):
    """The server could not be reached (refused, DNS, TLS, handshake rejected)."""

    code = "CONNECT_FAILED"
    counts_as_failure = True


class ConnectionLost(ClientError):
    """The connection dropped while an utterance was in flight and some of its audio had arrived."""

    code = "CONNECTION_LOST"
    counts_as_failure = True


class ClientTimeout(ClientError):
    code = "TIMEOUT"
    counts_as_failure = True


class ConnectTimeout(ClientTimeout, ConnectError):
    code = "CONNECT_TIMEOUT"


class FirstAudioTimeout(ClientTimeout):
    code = "FIRST_AUDIO_TIMEOUT"


class GapTimeout(ClientTimeout):
    """The server stopped sending in the middle of an utterance."""

    code = "GAP_TIMEOUT"


class CircuitOpen(ClientError):
    """The circuit breaker is open: the call failed fast, without touching the server.
    `retry_after`: seconds until it lets a probe through."""

    code = "CIRCUIT_OPEN"


class ClientClosed(ClientError):
    code = "CLIENT_CLOSED"

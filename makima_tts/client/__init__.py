"""A Python client for a makima-tts server: `AsyncClient` (asyncio) and `Client` (blocking).

Needs only `websockets`, `httpx` and numpy (`pip install 'makima-tts[client]'`); nothing of the
server or the engine is imported.
"""
from .aio import AsyncClient, ClientSettings, TextStream, Utterance
from .breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from .errors import (CircuitOpen, ClientClosed, ClientError, ClientTimeout, ConnectError, ConnectionLost,
                     ConnectTimeout, EmptyText, FirstAudioTimeout, GapTimeout, InvalidAudio, InvalidMessage,
                     InvalidVoiceId, Overloaded, RequestTimeout, RequestTooLarge, SendTimeout, ServerShutdown,
                     ForbiddenOrigin, ServerError, SessionTimeout, SynthesisError, TextTooLong,
                     TTSNotReady, TTSUnavailable, Unauthorized, UnsupportedFormat, UnsupportedLanguage,
                     UploadTooLarge, VoiceBuiltin, VoiceExists, VoiceNotFound)
from .sync import Client

__all__ = [
    "AsyncClient", "Client", "ClientSettings", "Utterance", "TextStream", "CircuitBreaker", "CLOSED", "OPEN",
    "HALF_OPEN", "ClientError", "ServerError", "CircuitOpen", "ClientClosed", "ClientTimeout", "ConnectError",
    "ConnectTimeout", "ConnectionLost", "FirstAudioTimeout", "GapTimeout", "InvalidMessage", "EmptyText",
    "TextTooLong", "UnsupportedFormat", "UnsupportedLanguage", "InvalidAudio", "InvalidVoiceId", "UploadTooLarge",
    "VoiceBuiltin", "VoiceNotFound", "VoiceExists", "TTSNotReady", "TTSUnavailable", "SynthesisError", "Overloaded",
    "SessionTimeout", "Unauthorized", "RequestTooLarge", "RequestTimeout", "SendTimeout", "ServerShutdown",
    "ForbiddenOrigin",
]

"""The speech service: what the routes that speak are handed (routes_ws's Session, routes_openai,
Wyoming), built once per app with its parts.

One utterance, `service.speak(text, ...)`:

    engine   = await engines.get()                      engines.EngineManager: which engine, loaded when
    voice    = voices.resolve_voice(voice, session)     on a worker thread (may compute a prompt)
    settings = engine.defaults.with_overrides(sampling)
    async with scheduler.slot():                        max_streams at once, max_queue waiting, else OVERLOADED
        async for pcm in synthesize(...): yield pcm     stream.py: worker thread -> Channel -> event loop

Text is checked where it comes in, by the helpers below (`check_text` for a whole text,
`check_piece` for a piece of streamed text), so that a refused message leaves nothing behind.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from contextlib import aclosing
from typing import TYPE_CHECKING, AsyncGenerator, Optional, Protocol

import numpy as np

from ..bridge import CancelToken
from ..engine.types import GenerationSettings, SpeechEngine
from ..errors import EmptyText, ServerShutdown, TextTooLong
from .engines import EngineManager
from .metrics import Metrics
from .scheduler import Scheduler
from .settings import Settings
from .stream import UtteranceStats, synthesize

if TYPE_CHECKING:
    from ..engine.generate import TextFeed
    from ..voices import ResolvedVoice, VoiceLibrary

log = logging.getLogger("makima_tts.server")
DRAIN_CHECK_S = 0.05          # shutting down: how often the drain looks whether the last utterance ended


# ---------------------------------------------------------------------- text checks (one place)

def check_text(text: Optional[str], max_chars: int) -> str:
    """A whole text to speak: EMPTY_TEXT, or TEXT_TOO_LONG over max_chars."""
    if text is None or not str(text).strip():
        raise EmptyText("text is empty")
    check_length(str(text), max_chars)
    return str(text)


def check_length(text: str, max_chars: int) -> None:
    if len(text) > max_chars:
        raise TextTooLong(f"text is {len(text)} characters; the limit is {max_chars} "
                          "(split it, or stream it with `text` messages)")


def check_piece(piece: str, before: str, max_chars: int, *, pending: bool, hint: str = "") -> None:
    """A piece of streamed text with the text `before` it: the text pending without a sentence end
    (pending=True, sentence mode) or the utterance's text so far (token mode). TEXT_TOO_LONG when the
    piece alone, or the two together, pass max_chars."""
    check_length(piece, max_chars)
    n = len(before) + len(piece)
    if n > max_chars:
        what = "pending without a sentence end " if pending else ""
        raise TextTooLong(f"the streamed text {what}would be {n} characters; the limit is {max_chars}{hint}")


# ---------------------------------------------------------------------- the service

class Voices(Protocol):
    """What the service needs of the voices (makima_tts.voices.VoiceService)."""

    library: "VoiceLibrary"

    def resolve_voice(self, requested: Optional[str], session_voice: Optional[str] = None) -> "ResolvedVoice":
        """The voice to speak with, by the order request, session, default_voice, makima, default
        (voices.resolve). Blocking: on a worker thread."""

    def default_voice_info(self) -> dict: ...


class SpeechService:
    def __init__(self, settings: Settings, engines: EngineManager, voices: Voices, metrics: Metrics,
                 executor: Executor):
        self.settings = settings
        self.engines = engines
        self.voices = voices
        self.metrics = metrics
        self.executor = executor
        self.scheduler: Optional[Scheduler] = None   # made on the running loop (start())
        self.sessions: set = set()      # open connections (WebSocket sessions, Wyoming handlers): busy, shut_down()
        self.active: set[CancelToken] = set()        # utterances generating now
        self.draining = False           # shutting down: no new work

    async def start(self) -> None:
        self.scheduler = Scheduler(self.settings.streams(), self.settings.max_queue, self.metrics)
        await self.engines.start()

    # ------------------------------------------------------------------ checks

    def check_text(self, text: Optional[str]) -> str:
        return check_text(text, self.settings.max_text_chars)

    def check_open(self) -> None:
        if self.draining:
            raise ServerShutdown("the server is shutting down; reconnect and retry later")

    def new_feed(self) -> Optional["TextFeed"]:
        """A TextFeed for text streamed token by token, where the serving engine takes it (else None)."""
        engine = self.engines.engine
        if engine is None or not hasattr(engine, "new_feed"):
            return None
        return engine.new_feed(max_chars=self.settings.max_text_chars)

    # ------------------------------------------------------------------ speaking

    async def speak(self, text: "str | TextFeed", *, voice: Optional[str] = None, session_voice: Optional[str] = None,
                    language: str = "auto", sampling: Optional[dict] = None, out_rate: int = 24000,
                    speed: float = 1.0, cancel: Optional[CancelToken] = None,
                    stats: Optional[UtteranceStats] = None) -> AsyncGenerator[np.ndarray, None]:
        """One utterance's audio, float32 mono at `out_rate`. `text` is checked already (check_text),
        or a TextFeed (its pieces checked as they are pushed). `stats` is filled as it goes (the voice
        before the first chunk). `cancel` stops it before the next frame; so does leaving the loop."""
        cancel = cancel if cancel is not None else CancelToken()
        stats = stats if stats is not None else UtteranceStats()
        engine = await self.engines.get(wait=True)
        resolved = await asyncio.get_running_loop().run_in_executor(
            self.executor, self.voices.resolve_voice, voice, session_voice)
        stats.voice = resolved.voice_id
        engine_voice = resolved.engine_voice       # a VoicePrompt (cloning engine) or a built-in speaker id
        if not isinstance(text, str) and hasattr(engine, "tokens_needed"):
            stats.tokens_needed = engine.tokens_needed(engine_voice)
        settings = generation_settings(engine, sampling)
        self.check_open()
        assert self.scheduler is not None, "SpeechService.start() was not awaited"
        try:
            async with self.scheduler.slot():
                self.check_open()
                if cancel.cancelled:
                    return
                self.active.add(cancel)
                audio = synthesize(engine, text, engine_voice, language=language or "auto", settings=settings,
                                   executor=self.executor, cancel=cancel, out_rate=int(out_rate), speed=float(speed),
                                   buffer_chunks=self.settings.send_buffer_chunks)
                try:
                    async with aclosing(audio):        # leaving early stops the engine now, not when collected
                        async for pcm in audio:
                            stats.audio(pcm, int(out_rate))
                            yield pcm
                finally:
                    self.active.discard(cancel)
        finally:
            stats.done()

    # ------------------------------------------------------------------ shutdown

    @property
    def busy(self) -> bool:
        return bool(self.active) or any(s.busy for s in self.sessions)

    async def drain(self, timeout: float) -> None:
        """Stop taking work; let what is generating finish for up to `timeout` s; then cancel what is
        left and tell every connection (SERVER_SHUTDOWN; the WebSocket closes with 1012)."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self.busy:
            log.info("shutting down: waiting up to %g s for %d utterance(s) to finish", timeout, len(self.active))
        while self.busy and loop.time() < deadline:
            await asyncio.sleep(DRAIN_CHECK_S)
        for token in list(self.active):
            token.cancel()
        if self.sessions:
            await asyncio.gather(*(s.shut_down() for s in list(self.sessions)), return_exceptions=True)


def generation_settings(engine: SpeechEngine, sampling: Optional[dict]) -> GenerationSettings:
    """The engine's defaults with a request's sampling overrides (protocol.Sampling)."""
    base = getattr(engine, "defaults", None) or GenerationSettings()
    return base.with_overrides(sampling)

"""One utterance whose text arrives in pieces (an LLM's output, Wyoming's `synthesize-chunk`s).

`StreamedUtterance(service, ...)`: `push(piece)` as they arrive (limits checked at once, by
speech.check_piece: nothing of a refused piece is taken), `end()` after the last, and
`async for pcm in utt.audio()` for the audio (float32 mono at `out_rate`), while pieces still
arrive; `cancel()` stops it (its CancelToken, which reaches the engine).

Where the engine takes text token by token (Qwen3: `engine.new_feed()`), the pieces go into one
TextFeed and the whole stream is one utterance of the model (its codes are those of the whole
text); elsewhere (Piper) it is spoken sentence by sentence (text.SentenceBuffer), each sentence
one `service.speak`.
"""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncGenerator, Optional

import numpy as np

from ..bridge import CancelToken
from ..errors import Overloaded
from ..text import SentenceBuffer
from .speech import SpeechService, check_piece
from .stream import UtteranceStats

log = logging.getLogger("makima_tts.server")


class StreamedUtterance:
    def __init__(self, service: SpeechService, *, voice: Optional[str] = None, language: str = "auto",
                 out_rate: int = 24000, sampling: Optional[dict] = None):
        self.service = service
        self.voice = voice
        self.language = language or "auto"
        self.out_rate = int(out_rate)
        self.sampling = sampling
        self.sentences = SentenceBuffer()
        self._ready: asyncio.Queue = asyncio.Queue()      # sentences to speak; None: the end
        self.queued_chars = 0
        self.ended = False
        self.token = CancelToken()
        self.voice_id: Optional[str] = None              # the voice that spoke (after the first sentence starts)
        self._started = False
        self.feed = service.new_feed()

    # ------------------------------------------------------------------ text in

    def push(self, piece: str) -> None:
        """A piece of the text. Over a limit (one piece or the pending text over max_text_chars; more than
        max_session_queue sentences or max_session_queue_chars characters waiting), nothing of it is taken."""
        self.service.check_open()
        if self.ended or self.cancelled:
            return
        piece = str(piece)
        max_chars = self.service.settings.max_text_chars
        if self.feed is not None:
            check_piece(piece, self.feed.text, max_chars, pending=False)
            self.feed.push(piece)
            if not self._started:                 # the first piece starts the one utterance
                self._started = True
                self._ready.put_nowait(self.feed)
            return
        pending = self.sentences.pending
        check_piece(piece, pending, max_chars, pending=True)
        self._check_room(0, len(pending) + len(piece))
        sentences = self.sentences.push(piece)
        try:
            self._check_room(len(sentences), 0)
        except Exception:
            self.sentences.restore(pending)
            raise
        for sentence in sentences:
            self._put(sentence)

    def end(self) -> None:
        """No more text: what is pending is spoken, then audio() ends."""
        if self.ended:
            return
        self.ended = True
        if self.feed is not None:
            self.feed.close()
        if not self.cancelled and self.feed is None:
            for sentence in self.sentences.flush():
                if sentence.strip():
                    self._put(sentence)
        self._ready.put_nowait(None)

    @property
    def cancelled(self) -> bool:
        return self.token.cancelled

    def cancel(self) -> None:
        """Stop before the next frame; audio() ends."""
        self.token.cancel()
        self.sentences.reset()
        if self.feed is not None:
            self.feed.close()
        self._ready.put_nowait(None)

    def _put(self, sentence: str) -> None:
        self.queued_chars += len(sentence)
        self._ready.put_nowait(sentence)

    def _check_room(self, sentences: int, chars: int) -> None:
        s = self.service.settings
        if sentences and self._ready.qsize() + sentences > s.max_session_queue:
            raise Overloaded(f"{self._ready.qsize()} sentences are waiting to be spoken; the limit is "
                             f"{s.max_session_queue}")
        if chars and self.queued_chars + chars > s.max_session_queue_chars:
            raise Overloaded(f"{self.queued_chars} characters are waiting to be spoken; the limit is "
                             f"{s.max_session_queue_chars}")

    # ------------------------------------------------------------------ audio out

    async def audio(self) -> AsyncGenerator[np.ndarray, None]:
        """The utterance's audio, as it is made, until end() (or cancel()). Raises the engine's errors."""
        service = self.service
        while True:
            sentence = await self._ready.get()
            if sentence is None or self.cancelled:
                return
            if isinstance(sentence, str):
                self.queued_chars = max(0, self.queued_chars - len(sentence))
            stats = UtteranceStats()
            outcome = "cancelled"
            audio = service.speak(sentence, voice=self.voice, language=self.language, sampling=self.sampling,
                                  out_rate=self.out_rate, cancel=self.token, stats=stats)
            try:
                async for pcm in audio:
                    self.voice_id = stats.voice
                    if self.cancelled:
                        break
                    yield pcm
                else:
                    outcome = "cancelled" if self.cancelled else "ok"
            except Exception:
                outcome = "error"
                raise
            finally:
                await audio.aclose()
                self.voice_id = stats.voice or self.voice_id
                service.metrics.utterance(service.engines.name, outcome, stats)

"""One utterance whose text arrives in pieces (an LLM's output, Wyoming's `synthesize-chunk`s).

`StreamedUtterance` is the single place where streamed text pieces become audio: `push(piece)` as
they arrive (limits checked at once: nothing of a refused piece is taken), `end()` after the last,
and `async for pcm in utt.audio()` for the audio (float32 mono at `out_rate`), while pieces still
arrive. Today the text is spoken sentence by sentence, the server's `text` path: each sentence is
complete (text.SentenceBuffer) before it goes to the engine as one Synthesis. Token-level streaming
(issue 16, item 1) replaces the inside of `push`/`end`/`audio` with one engine stream fed token by
token; callers do not change.

Where the engine takes text token by token (Qwen3: `engine.new_feed()`), the pieces go into one
TextFeed and the whole stream is one utterance of the model (its codes are those of the whole
text); elsewhere (Piper) it is spoken sentence by sentence.
"""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Optional

import numpy as np

from ..errors import Overloaded, TextTooLong
from ..text import SentenceBuffer
from .stream import Synthesis

log = logging.getLogger("makima_tts.server")


class StreamedUtterance:
    def __init__(self, ctx, *, voice: Optional[str] = None, language: str = "auto", out_rate: int = 24000,
                 sampling: Optional[dict] = None):
        self.ctx = ctx
        self.voice = voice
        self.language = language or "auto"
        self.out_rate = int(out_rate)
        self.sampling = sampling
        self.sentences = SentenceBuffer()
        self._ready: asyncio.Queue = asyncio.Queue()      # sentences to speak; None: the end
        self.queued_chars = 0
        self.ended = False
        self.cancelled = False
        self.voice_id: Optional[str] = None              # the voice that spoke (after the first sentence starts)
        self._synth: Optional[Synthesis] = None
        self._started = False
        engine = ctx.engine
        self.feed = engine.new_feed(max_chars=ctx.settings.max_text_chars) \
            if engine is not None and hasattr(engine, "new_feed") else None

    # ------------------------------------------------------------------ text in

    def push(self, piece: str) -> None:
        """A piece of the text. Over a limit (one piece or the pending text over max_text_chars; more than
        max_session_queue sentences or max_session_queue_chars characters waiting), nothing of it is taken."""
        ctx, s = self.ctx, self.ctx.settings
        ctx.check_open()
        if self.ended or self.cancelled:
            return
        piece = str(piece)
        if len(piece) > s.max_text_chars:
            ctx.check_length(piece)
        if self.feed is not None:
            try:
                self.feed.push(piece)
            except ValueError:
                raise TextTooLong(f"the streamed text would be {len(self.feed.text) + len(piece)} characters; "
                                  f"the limit is {s.max_text_chars}") from None
            if not self._started:                 # the first piece starts the one utterance
                self._started = True
                self._ready.put_nowait(self.feed)
            return
        pending = self.sentences.pending
        if len(pending) + len(piece) > s.max_text_chars:
            raise TextTooLong(f"the streamed text pending without a sentence end would be {len(pending) + len(piece)} "
                              f"characters; the limit is {s.max_text_chars}")
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

    def cancel(self) -> None:
        """Stop before the next frame; audio() ends."""
        self.cancelled = True
        self.sentences.reset()
        if self.feed is not None:
            self.feed.close()
        if self._synth is not None:
            self._synth.cancel()
        self._ready.put_nowait(None)

    def _put(self, sentence: str) -> None:
        self.queued_chars += len(sentence)
        self._ready.put_nowait(sentence)

    def _check_room(self, sentences: int, chars: int) -> None:
        s = self.ctx.settings
        if sentences and self._ready.qsize() + sentences > s.max_session_queue:
            raise Overloaded(f"{self._ready.qsize()} sentences are waiting to be spoken; the limit is "
                             f"{s.max_session_queue}")
        if chars and self.queued_chars + chars > s.max_session_queue_chars:
            raise Overloaded(f"{self.queued_chars} characters are waiting to be spoken; the limit is "
                             f"{s.max_session_queue_chars}")

    # ------------------------------------------------------------------ audio out

    async def audio(self) -> AsyncIterator[np.ndarray]:
        """The utterance's audio, as it is made, until end() (or cancel()). Raises the engine's errors."""
        ctx = self.ctx
        while True:
            sentence = await self._ready.get()
            if sentence is None or self.cancelled:
                return
            if isinstance(sentence, str):
                self.queued_chars = max(0, self.queued_chars - len(sentence))
            synth = Synthesis(ctx, sentence, voice=self.voice, language=self.language, sampling=self.sampling,
                              out_rate=self.out_rate)
            self._synth = synth
            outcome = "cancelled"
            agen = synth.run()
            try:
                async for pcm in agen:
                    self.voice_id = synth.stats.voice
                    if self.cancelled:
                        break
                    yield pcm
                else:
                    outcome = "cancelled" if self.cancelled else "ok"
            except Exception:
                outcome = "error"
                raise
            finally:
                await agen.aclose()
                self.voice_id = synth.stats.voice or self.voice_id
                ctx.metrics.utterance(ctx.engine_name, outcome, synth.stats)
                self._synth = None

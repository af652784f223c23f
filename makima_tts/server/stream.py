"""One utterance: the engine's generator in a worker thread, its chunks out as an async iterator.

The worker hands chunks over through a small bounded queue: a consumer that stops reading
(a slow client) fills it and the worker waits, so generation pauses instead of piling up
audio in memory. `close()` (or leaving the `async for`) cancels the engine before its next
frame and returns the generation slot once the worker has stopped.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Optional

import numpy as np

from ..audio import StreamResampler, time_stretch
from ..engine.types import CancelToken, GenerationSettings
from ..errors import MakimaError, SynthesisError

log = logging.getLogger("makima_tts.server")
_END = object()
WORKER_STOP_WAIT_S = 10.0   # after a cancellation: how long to wait for the worker thread to stop
SAMPLE_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
_STRETCH_MIN_S = 0.5      # speed != 1: stretch at least this much audio at a time


@dataclass
class UtteranceStats:
    started: float = 0.0          # perf_counter when the request was taken up
    ttfa_s: Optional[float] = None
    audio_s: float = 0.0
    total_s: float = 0.0
    voice: Optional[str] = None
    tokens_needed: Optional[int] = None   # text streamed token by token: tokens needed before the start

    @property
    def rtf(self) -> Optional[float]:
        return self.total_s / self.audio_s if self.audio_s > 0 else None


class Synthesis:
    """`async for pcm in Synthesis(ctx, ...).run()`: float32 mono PCM at `out_rate`."""

    def __init__(self, ctx, text, *, voice: Optional[str], session_voice: Optional[str] = None,
                 language: str = "auto", sampling: Optional[dict] = None, out_rate: int = 24000,
                 speed: float = 1.0):
        self.ctx = ctx
        # a str, or a TextFeed (text arriving in pieces, fed to the model token by token; limits are
        # checked as pieces are pushed)
        self.text = ctx.check_text(text) if isinstance(text, str) else text
        self.voice = voice
        self.session_voice = session_voice
        self.language = language or "auto"
        self.sampling = sampling
        self.out_rate = int(out_rate)
        self.speed = float(speed)
        self.cancel_token = CancelToken()
        self.stats = UtteranceStats(started=time.perf_counter())
        self._queue: Optional[asyncio.Queue] = None

    def cancel(self) -> None:
        """Stop before the next frame (call on the event loop)."""
        self.cancel_token.cancel()
        if self._queue is not None:
            try:
                self._queue.put_nowait(_END)      # wake a consumer waiting for the next chunk
            except asyncio.QueueFull:
                pass

    async def run(self) -> AsyncIterator[np.ndarray]:
        ctx = self.ctx
        engine = await ctx.get_engine(wait=True)
        loop = asyncio.get_running_loop()
        resolved = await loop.run_in_executor(ctx.executor, ctx.resolve_voice, self.voice, self.session_voice)
        self.stats.voice = resolved.voice_id
        voice_obj = resolved.engine_voice       # a VoicePrompt (cloning engine) or a built-in speaker id
        if not isinstance(self.text, str) and hasattr(engine, "tokens_needed"):
            self.stats.tokens_needed = engine.tokens_needed(voice_obj)
        settings: Optional[GenerationSettings] = ctx.generation_settings(self.sampling)
        ctx.check_open()
        async with ctx.scheduler.slot():
            ctx.check_open()
            if self.cancel_token.cancelled:
                return
            queue: asyncio.Queue = asyncio.Queue(maxsize=max(1, ctx.settings.send_buffer_chunks))
            self._queue = queue
            ctx.synths.add(self)
            worker = loop.run_in_executor(ctx.executor, self._work, engine, voice_obj, settings, queue, loop)
            resampler = StreamResampler(engine.sample_rate, self.out_rate) if engine.sample_rate != self.out_rate \
                else None
            held: list[np.ndarray] = []
            try:
                while True:
                    item = await queue.get()
                    if item is _END or self.cancel_token.cancelled:
                        break
                    if isinstance(item, BaseException):
                        raise item
                    pcm = resampler.process(item) if resampler else item
                    out = self._stretch(held, pcm, final=False)
                    if out is not None and len(out):
                        yield self._count(out)
                if self.cancel_token.cancelled:
                    return
                tail = resampler.flush() if resampler else np.zeros(0, np.float32)
                out = self._stretch(held, tail, final=True)
                if out is not None and len(out):
                    yield self._count(out)
            finally:
                self.cancel_token.cancel()
                while not queue.empty():           # unblock a worker waiting to put
                    queue.get_nowait()
                try:
                    await _stopped(worker)
                finally:
                    ctx.synths.discard(self)
                    self.stats.total_s = time.perf_counter() - self.stats.started

    def _count(self, pcm: np.ndarray) -> np.ndarray:
        if self.stats.ttfa_s is None:
            self.stats.ttfa_s = time.perf_counter() - self.stats.started
        self.stats.audio_s += len(pcm) / self.out_rate
        return pcm

    def _stretch(self, held: list, pcm: np.ndarray, final: bool) -> Optional[np.ndarray]:
        if self.speed == 1.0:
            return pcm
        held.append(pcm)
        n = sum(len(p) for p in held)
        if not final and n < _STRETCH_MIN_S * self.out_rate:
            return None
        block = np.concatenate(held) if held else np.zeros(0, np.float32)
        held.clear()
        return time_stretch(block, self.out_rate, self.speed) if len(block) else block

    def _work(self, engine, voice_obj, settings, queue: asyncio.Queue, loop) -> None:
        token = self.cancel_token

        def put(item) -> bool:
            fut = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
            while True:
                try:
                    fut.result(timeout=0.05)
                    return True
                except concurrent.futures.TimeoutError:
                    if token.cancelled:
                        fut.cancel()
                        return False
                except Exception:
                    return False

        try:
            for chunk in engine.stream(self.text, voice_obj, self.language, settings, cancel=token):
                if token.cancelled or not put(np.asarray(chunk.pcm, dtype=np.float32)):
                    return
            put(_END)
        except MakimaError as e:
            put(e)
        except Exception:  # a bug or a model failure: a clear error, not a dead session
            log.exception("synthesis failed")
            put(SynthesisError("synthesis failed (an internal error in the engine; the server log has the details)"))


async def _stopped(worker: asyncio.Future) -> None:
    """Wait for the worker thread to stop (its token is cancelled: it stops before its next frame), so
    the generation slot is returned only once it has. A cancellation of the waiting task is not lost:
    it is raised once the worker has stopped (or after WORKER_STOP_WAIT_S if it does not)."""
    cancelled: Optional[BaseException] = None
    deadline = None
    loop = asyncio.get_running_loop()
    while not worker.done():
        try:
            if deadline is None:
                await asyncio.shield(worker)
            else:
                left = deadline - loop.time()
                if left <= 0:
                    log.warning("an engine worker did not stop within %g s of its cancellation", WORKER_STOP_WAIT_S)
                    break
                await asyncio.wait_for(asyncio.shield(worker), left)
        except asyncio.CancelledError as e:
            cancelled = e
            if deadline is None:
                deadline = loop.time() + WORKER_STOP_WAIT_S
        except asyncio.TimeoutError:
            continue
        except Exception:
            break
    if cancelled is not None:
        raise cancelled

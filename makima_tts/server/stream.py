"""The synthesizer: an engine, a voice and settings in; float32 PCM out, as an async iterator.

`synthesize()` runs the engine's generator on a worker thread and hands its chunks to the event
loop through a bounded `Channel` (makima_tts.bridge): a consumer that stops reading (a slow
client) fills it and the worker waits, so generation pauses instead of piling up audio. Leaving
the `async for` (or cancelling the token it was given) cancels the engine before its next frame;
the generator returns only once the worker has stopped, so the generation slot its caller holds
is free for real when it is released. Errors of the engine are wrapped here, once: a MakimaError
passes as it is, anything else is logged and becomes SYNTHESIS_ERROR.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncGenerator, Optional

import numpy as np

from ..audio import StreamResampler, time_stretch
from ..bridge import CancelToken, Channel
from ..engine.types import GenerationSettings, SpeechEngine
from ..errors import MakimaError, SynthesisError

if TYPE_CHECKING:
    from ..engine.generate import TextFeed

log = logging.getLogger("makima_tts.server")
WORKER_STOP_WAIT_S = 10.0   # after a cancellation: how long to wait for the worker thread to stop
SAMPLE_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
_STRETCH_MIN_S = 0.5        # speed != 1: stretch at least this much audio at a time


@dataclass
class UtteranceStats:
    """What one utterance took: filled as it is spoken; `audio_end`, the metrics and logs read it."""

    started: float = field(default_factory=time.perf_counter)   # when the request was taken up
    ttfa_s: Optional[float] = None
    audio_s: float = 0.0
    total_s: float = 0.0
    voice: Optional[str] = None
    tokens_needed: Optional[int] = None   # text streamed token by token: tokens needed before the start

    @property
    def rtf(self) -> Optional[float]:
        return self.total_s / self.audio_s if self.audio_s > 0 else None

    def audio(self, pcm: np.ndarray, rate: int) -> None:
        if self.ttfa_s is None:
            self.ttfa_s = time.perf_counter() - self.started
        self.audio_s += len(pcm) / rate

    def done(self) -> None:
        self.total_s = time.perf_counter() - self.started


async def synthesize(engine: SpeechEngine, text: "str | TextFeed", voice: Any, *, language: str,
                     settings: Optional[GenerationSettings], executor: Executor, cancel: CancelToken,
                     out_rate: int = 24000, speed: float = 1.0,
                     buffer_chunks: int = 8) -> AsyncGenerator[np.ndarray, None]:
    """The utterance's audio at `out_rate` (resampled, and time-stretched when speed != 1).
    `voice` is what `engine.stream` takes (a built-in voice id, or a VoicePrompt)."""
    token = cancel.child()               # this synthesis alone: ends with it, and with `cancel`
    channel: Channel[np.ndarray] = Channel(maxsize=max(1, buffer_chunks), cancel=token)
    loop = asyncio.get_running_loop()
    worker = loop.run_in_executor(executor, _produce, engine, text, voice, language, settings, token, channel)
    resampler = StreamResampler(engine.sample_rate, out_rate) if engine.sample_rate != out_rate else None
    stretch = _Stretch(out_rate, speed)
    try:
        async for pcm in channel:
            out = stretch.push(resampler.process(pcm) if resampler else pcm)
            if out is not None and len(out):
                yield out
        if token.cancelled:
            return
        out = stretch.finish(resampler.flush() if resampler else np.zeros(0, np.float32))
        if len(out):
            yield out
    finally:
        token.cancel()                   # the engine stops before its next frame; a blocked put returns
        channel.close()
        await _stopped(worker)


def _produce(engine: SpeechEngine, text, voice, language: str, settings: Optional[GenerationSettings],
             cancel: CancelToken, channel: Channel) -> None:
    """The worker thread: the engine's chunks into the channel until the end, an error or a cancel."""
    chunks = None
    try:
        chunks = engine.stream(text, voice, language, settings, cancel=cancel)
        for chunk in chunks:
            if not channel.put(np.asarray(chunk.pcm, dtype=np.float32)):
                return
        channel.end()
    except MakimaError as e:
        channel.fail(e)
    except Exception:  # a bug or a model failure: a clear error, not a dead session
        log.exception("synthesis failed")
        channel.fail(SynthesisError("synthesis failed (an internal error in the engine; the server log has the "
                                    "details)"))
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()                      # the engine's generator ends here, on its own thread


class _Stretch:
    """speed != 1: the audio time-stretched in blocks of at least _STRETCH_MIN_S (pitch kept)."""

    def __init__(self, rate: int, speed: float):
        self.rate, self.speed = rate, float(speed)
        self.held: list[np.ndarray] = []

    def push(self, pcm: np.ndarray) -> Optional[np.ndarray]:
        if self.speed == 1.0:
            return pcm
        self.held.append(pcm)
        if sum(len(p) for p in self.held) < _STRETCH_MIN_S * self.rate:
            return None
        return self._block()

    def finish(self, pcm: np.ndarray) -> np.ndarray:
        if self.speed == 1.0:
            return pcm
        self.held.append(pcm)
        return self._block()

    def _block(self) -> np.ndarray:
        block = np.concatenate(self.held) if self.held else np.zeros(0, np.float32)
        self.held.clear()
        return time_stretch(block, self.rate, self.speed) if len(block) else block


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

"""The utterance pipeline (SpeechService.speak, server/stream.py) with a stand-in engine: flow control and
cancellation."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from makima_tts.engine.types import AudioChunk, CancelToken, VoiceInfo
from makima_tts.errors import Overloaded
from makima_tts.server.context import ServerContext
from makima_tts.server.settings import Settings


class EndlessEngine:
    """Yields 80 ms chunks for ever, counting them, stopping when cancelled."""

    name = "endless"
    model_id = "endless"
    sample_rate = 24000
    supports_cloning = False

    def __init__(self):
        self.produced = 0
        self.closed = threading.Event()

    def builtin_voices(self):
        return [VoiceInfo("e", "E", "english")]

    def stream(self, text, voice=None, language="auto", settings=None, cancel=None):
        try:
            i = 0
            while not (cancel and cancel.cancelled):
                self.produced += 1
                yield AudioChunk(np.full(1920, 0.1, np.float32), 24000, i, i, 1, False)
                i += 1
                time.sleep(0.001)
        finally:
            self.closed.set()


def make_ctx(tmp_path, **kw):
    return ServerContext(Settings(voices_dir=tmp_path, **kw), engine=EndlessEngine())


def test_a_consumer_that_stops_reading_pauses_generation(tmp_path):
    ctx = make_ctx(tmp_path, send_buffer_chunks=4)

    async def main():
        await ctx.start()
        audio = ctx.speech.speak("endless text")
        await audio.__anext__()
        await asyncio.sleep(1.0)                  # a slow client: nothing read for a while
        produced = ctx.engine.produced
        assert produced <= 4 + 3                  # the buffer, one in hand, one being put
        await audio.aclose()                      # the client goes away
        assert ctx.engine.closed.wait(5)
        assert ctx.speech.scheduler.running == 0

    asyncio.run(main())
    ctx.close()


def test_cancel_ends_the_stream_and_frees_the_slot(tmp_path):
    ctx = make_ctx(tmp_path, max_streams=1, max_queue=0)

    async def main():
        await ctx.start()
        token = CancelToken()
        got = 0
        async for _ in ctx.speech.speak("endless", cancel=token):
            got += 1
            if got == 3:
                token.cancel()
            if got > 20:
                break
        assert got < 20                            # ended right after the cancel
        assert ctx.engine.closed.wait(5) and ctx.speech.scheduler.running == 0

    asyncio.run(main())
    ctx.close()


def test_full_slots_and_queue_overload(tmp_path):
    ctx = make_ctx(tmp_path, max_streams=1, max_queue=1)

    async def main():
        await ctx.start()
        first = ctx.speech.speak("one")
        await first.__anext__()                    # holds the only slot
        second = ctx.speech.speak("two")
        waiting = asyncio.ensure_future(second.__anext__())   # waits in the queue
        await asyncio.sleep(0.1)
        assert ctx.speech.scheduler.waiting == 1
        with pytest.raises(Overloaded):
            await ctx.speech.speak("three").__anext__()
        await first.aclose()
        assert len(await asyncio.wait_for(waiting, 10)) == 1920   # got the slot once the first left
        await second.aclose()

    asyncio.run(main())
    ctx.close()

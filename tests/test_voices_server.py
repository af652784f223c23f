"""Issue 4 over a real server: a voice uploaded over HTTP speaks on the WebSocket and the
OpenAI endpoint; its prompt is computed once, across sessions and across a restart."""
from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import soundfile as sf

from makima_tts.testing import REF_TEXT
from makima_tts.testing.server import ServerProcess, metric
from tests.test_server import sdk
from tests.wsclient import Client

openai = pytest.importorskip("openai")


def wav_bytes(pcm, sr=24000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, pcm, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_uploaded_voice_speaks_everywhere_and_is_computed_once(tiny_checkpoint, ref_clip, tmp_path):
    voices = tmp_path / "voices"
    args = ("--checkpoint", str(tiny_checkpoint), "--voices-dir", str(voices))
    stereo_44k = np.stack([ref_clip, ref_clip * 0.9], axis=1)
    import soxr

    stereo_44k = soxr.resample(stereo_44k, 24000, 44100).astype(np.float32)
    with ServerProcess(*args) as s:
        s.wait_ready()
        r = httpx.post(s.url + "/api/v1/voices", timeout=120,
                       files={"file": ("anna.wav", wav_bytes(stereo_44k, 44100), "audio/wav")},
                       data={"name": "Anna", "transcript": REF_TEXT, "language": "english"})
        assert r.status_code == 201, r.text
        vid = r.json()["voice_id"]
        assert vid == "anna" and r.json()["sample_rate"] == 24000
        assert metric(s, "makima_voice_prompt_computations_total") == 1
        for _ in range(2):                                     # two sessions
            with Client(s.ws_url) as c:
                c.recv_json()
                _, audio = c.utterance("Hello.", voice=vid)
                assert len(audio) > 0
        data = sdk(s).audio.speech.create(model="tts-1", voice=vid, input="Hello.", response_format="pcm").read()
        assert len(data) > 0
        assert metric(s, "makima_voice_prompt_computations_total") == 1
        got = httpx.get(f"{s.url}/api/v1/voices/{vid}").json()
        assert got["transcript"] == REF_TEXT and got["name"] == "Anna"
        audio = httpx.get(f"{s.url}/api/v1/voices/{vid}/audio")
        pcm, sr = sf.read(io.BytesIO(audio.content))
        assert sr == 24000 and pcm.ndim == 1
    with ServerProcess(*args) as s:                            # restart: loaded, not recomputed
        s.wait_ready()
        with Client(s.ws_url) as c:
            c.recv_json()
            _, audio = c.utterance("Hello again.", voice=vid)
            assert len(audio) > 0
        assert metric(s, "makima_voice_prompt_computations_total") == 0
        r = httpx.patch(f"{s.url}/api/v1/voices/{vid}", json={"transcript": "Hello world."}, timeout=120)
        assert r.status_code == 200
        with Client(s.ws_url) as c:
            c.recv_json()
            c.utterance("Changed.", voice=vid)
        assert metric(s, "makima_voice_prompt_computations_total") == 1    # a new transcript: recomputed


@pytest.mark.parametrize("name,data,code", [
    ("empty.wav", b"", "INVALID_AUDIO"),
    ("trunc.wav", None, "INVALID_AUDIO"),
    ("notes.txt", b"this is not audio at all" * 100, "INVALID_AUDIO"),
    ("short.wav", "short", "INVALID_AUDIO"),
])
def test_bad_uploads_over_http_leave_nothing(tiny_checkpoint, ref_clip, tmp_path, name, data, code):
    if data is None:
        data = wav_bytes(ref_clip)[:2000]
    elif data == "short":
        data = wav_bytes(ref_clip[:12000])
    voices = tmp_path / "voices"
    with ServerProcess("--checkpoint", str(tiny_checkpoint), "--voices-dir", str(voices)) as s:
        s.wait_ready()
        r = httpx.post(s.url + "/api/v1/voices", files={"file": (name, data, "audio/wav")},
                       data={"voice_id": "bad", "name": "Bad", "transcript": REF_TEXT})
        assert r.status_code == 400 and r.json()["error"]["code"] == code and r.json()["error"]["message"]
        assert "0x" not in r.json()["error"]["message"]          # words, not object reprs
        r = httpx.post(s.url + "/api/v1/voices", files={"file": ("x.wav", wav_bytes(ref_clip), "audio/wav")},
                       data={"voice_id": "../evil", "name": "x", "transcript": REF_TEXT})
        assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_VOICE_ID"
        assert not (tmp_path / "evil").exists()
        assert [p.name for p in voices.iterdir() if not p.name.startswith(".")] == []

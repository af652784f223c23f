"""Error paths that need a stand-in engine: a model still loading, a model that fails mid-stream.
The app runs in-process (Starlette's TestClient drives the real ASGI app)."""
from __future__ import annotations

import threading

import numpy as np
from starlette.testclient import TestClient

from makima_tts.engine.types import AudioChunk, VoiceInfo
from makima_tts.server.app import create_app
from makima_tts.server.engines import EngineManager
from makima_tts.server.settings import Settings


class FailingEngine:
    """Two chunks, then a crash (as a model running out of memory would)."""

    name = "failing"
    model_id = "failing"
    sample_rate = 24000
    supports_cloning = False

    def builtin_voices(self):
        return [VoiceInfo("f", "F", "english")]

    def stream(self, text, voice=None, language="auto", settings=None, cancel=None):
        for i in range(2):
            yield AudioChunk(np.full(1920, 0.1, np.float32), 24000, i, i, 1, False)
        if "fail" in text:
            raise RuntimeError("CUDA out of memory (simulated)")
        yield AudioChunk(np.zeros(0, np.float32), 24000, 2, 2, 0, True)


def test_synthesis_error_mid_stream_is_reported_and_session_goes_on(tmp_path):
    app = create_app(Settings(voices_dir=tmp_path), engine=FailingEngine())
    with TestClient(app) as client, client.websocket_connect("/api/v1/speak") as ws:
        assert ws.receive_json()["type"] == "ready"
        ws.send_json({"type": "speak", "text": "this will fail", "id": "a"})
        assert ws.receive_json() == {"type": "audio_start", "id": "a", "voice": "f"}
        assert len(ws.receive_bytes()) == 3840 and len(ws.receive_bytes()) == 3840
        err = ws.receive_json()
        assert err["type"] == "error" and err["code"] == "SYNTHESIS_ERROR" and err["id"] == "a"
        assert err["recoverable"] is True
        assert "out of memory" not in err["message"] and "RuntimeError" not in err["message"]   # no internals
        ws.send_json({"type": "speak", "text": "this works", "id": "b"})
        assert ws.receive_json()["type"] == "audio_start"
        ws.receive_bytes(), ws.receive_bytes()
        assert ws.receive_json()["type"] == "audio_end"
    r = client.get("/metrics").text
    assert 'makima_errors_total{code="SYNTHESIS_ERROR"} 1.0' in r


def test_not_ready_while_loading(tmp_path, monkeypatch):
    release = threading.Event()
    original = EngineManager._load_engine

    def slow_load(self):
        release.wait(30)
        original(self)

    monkeypatch.setattr(EngineManager, "_load_engine", slow_load)
    app = create_app(Settings(voices_dir=tmp_path, engine="piper"))
    with TestClient(app) as client:
        r = client.get("/ready")
        assert r.status_code == 503 and r.json()["reason"] == "the model is loading"
        r = client.post("/v1/audio/speech", json={"input": "Hello.", "voice": "alloy"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "TTS_NOT_READY"
        assert client.get("/health").status_code == 200
        release.set()
        with client.websocket_connect("/api/v1/speak") as ws:    # the WebSocket waits for the model
            first = ws.receive_json()
            assert first["type"] in ("status", "ready")
            if first["type"] == "status":
                assert first["state"] == "loading" and ws.receive_json()["type"] == "ready"
        assert client.get("/ready").status_code == 200


def test_lazy_load_loads_on_first_request(tmp_path):
    app = create_app(Settings(voices_dir=tmp_path, engine="piper", lazy_load=True))
    with TestClient(app) as client:
        r = client.get("/ready")
        assert r.status_code == 503 and "lazy" in r.json()["reason"]
        r = client.post("/v1/audio/speech", json={"input": "Hello there.", "voice": "alloy", "response_format": "pcm"})
        assert r.status_code == 200 and len(r.content) > 24000
        assert client.get("/ready").json()["engine"] == "piper"


def test_no_engine_at_all_is_tts_unavailable(tmp_path, monkeypatch):
    def no_piper(self):
        raise ImportError("No module named 'piper'")

    monkeypatch.setattr(EngineManager, "load_piper", no_piper)
    app = create_app(Settings(voices_dir=tmp_path))        # auto, no checkpoint, no embedded engine
    with TestClient(app) as client:
        with client.websocket_connect("/api/v1/speak") as ws:
            msg = ws.receive_json()
            while msg["type"] == "status":
                msg = ws.receive_json()
            assert msg["type"] == "error" and msg["code"] == "TTS_UNAVAILABLE" and msg["recoverable"] is False
            assert "makima-tts[piper]" in msg["message"]
        r = client.get("/ready")
        assert r.status_code == 503 and "no Qwen3-TTS checkpoint" in r.json()["reason"]
        r = client.post("/v1/audio/speech", json={"input": "Hello.", "voice": "alloy"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "TTS_UNAVAILABLE"


def test_http_errors_are_counted_by_code(tmp_path):
    app = create_app(Settings(voices_dir=tmp_path), engine=FailingEngine())
    with TestClient(app) as client:
        assert client.post("/v1/audio/speech", json={"input": " ", "voice": "f"}).status_code == 400
        assert client.post("/v1/audio/speech", json={"input": "hi", "voice": "nobody"}).status_code == 404
        text = client.get("/metrics").text
    assert 'makima_errors_total{code="EMPTY_TEXT"} 1.0' in text
    assert 'makima_errors_total{code="VOICE_NOT_FOUND"} 1.0' in text

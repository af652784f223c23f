"""Issue 15: OVERLOADED says when to retry: `retry_after_ms` on the WebSocket `error`, `Retry-After`
(whole seconds) on HTTP 429; estimated by the scheduler from how long slots are held."""
from __future__ import annotations

import asyncio

from starlette.testclient import TestClient

from makima_tts.errors import Overloaded
from makima_tts.server.app import create_app
from makima_tts.server.metrics import Metrics
from makima_tts.server.scheduler import Scheduler
from makima_tts.server.settings import Settings
from tests.fakeserver import FakeEngine


def test_overloaded_carries_a_retry_hint_on_websocket_and_http(tmp_path):
    app = create_app(Settings(voices_dir=tmp_path / "v", max_streams=1, max_queue=0), engine=FakeEngine())
    with TestClient(app) as client:
        with client.websocket_connect("/api/v1/speak") as busy:
            assert busy.receive_json()["type"] == "ready"
            busy.send_json({"type": "speak", "text": "endless talk", "id": "busy"})
            assert busy.receive_json()["type"] == "audio_start"        # holds the only slot
            with client.websocket_connect("/api/v1/speak") as ws:
                assert ws.receive_json()["type"] == "ready"
                ws.send_json({"type": "speak", "text": "Hi.", "id": "x"})
                err = ws.receive_json()
                assert err["type"] == "error" and err["code"] == "OVERLOADED" and err["id"] == "x"
                assert isinstance(err["retry_after_ms"], int) and 100 <= err["retry_after_ms"] <= 30000
            r = client.post("/v1/audio/speech", json={"input": "Hi.", "response_format": "pcm"})
            assert r.status_code == 429 and r.json()["error"]["code"] == "OVERLOADED"
            assert r.headers["retry-after"].isdigit() and 1 <= int(r.headers["retry-after"]) <= 30
            busy.send_json({"type": "cancel"})


def test_other_errors_carry_no_retry_hint(tmp_path):
    app = create_app(Settings(voices_dir=tmp_path / "v"), engine=FakeEngine())
    with TestClient(app) as client:
        r = client.post("/v1/audio/speech", json={"input": "", "response_format": "pcm"})
        assert r.status_code == 400 and "retry-after" not in r.headers
        with client.websocket_connect("/api/v1/speak") as ws:
            ws.receive_json()
            ws.send_json({"type": "speak", "text": ""})
            err = ws.receive_json()
            assert err["type"] == "error" and "retry_after_ms" not in err


def test_the_scheduler_estimates_the_wait_from_slot_holding_times():
    async def main():
        s = Scheduler(max_streams=2, max_queue=0, metrics=Metrics())
        assert s.retry_after_ms() == Overloaded.DEFAULT_RETRY_AFTER_MS == 1000   # nothing measured yet
        s.hold_s = 4.0
        assert s.retry_after_ms() == 2000        # 4 s a slot, 2 slots, nobody waiting
        s.waiting = 3
        assert s.retry_after_ms() == 8000
        s.hold_s = 1000.0
        assert s.retry_after_ms() == 30000       # clamped
        s.hold_s, s.waiting = None, 0
        async with s.slot():
            async with s.slot():
                try:
                    async with s.slot():
                        raise AssertionError("a third slot")
                except Overloaded as e:
                    assert e.retry_after_ms == 1000
        assert s.hold_s is not None and s.hold_s < 5     # measured once slots were released
        assert 100 <= s.retry_after_ms() <= 1000
    asyncio.run(main())

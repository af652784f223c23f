"""Issue 15: a property-based fuzz of the WebSocket protocol (hypothesis). Any sequence of client
messages, well-formed or not, gets well-formed replies, never a crash, a leak or a hang: afterwards
the session answers, and once closed nothing is left running."""
from __future__ import annotations

import json
import time

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from makima_tts.server.app import create_app  # noqa: E402
from makima_tts.server.settings import Settings  # noqa: E402
from tests.fakeserver import FakeEngine  # noqa: E402

TYPES = ["start", "speak", "text", "flush", "cancel", "nonsense", ""]
REPLY_TYPES = {"ready", "audio_start", "audio_end", "cancelled", "error", "status"}

json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
                           | st.text(max_size=30),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=4),
                           max_leaves=12)
fields = st.fixed_dictionaries({}, optional={
    "text": st.text(max_size=200) | json_values, "id": st.text(max_size=12) | json_values,
    "voice": st.sampled_from(["f", "default", "alloy", "nope", "../x"]) | json_values,
    "language": st.sampled_from(["auto", "english", "klingon"]) | json_values,
    "interrupt": st.booleans() | json_values, "format": st.sampled_from(["pcm_s16le", "pcm_f32le", "mp3"]),
    "sample_rate": st.sampled_from([8000, 24000, 44100, 12345]),
    "sampling": st.fixed_dictionaries({}, optional={"temperature": st.floats(-1, 10), "seed": st.integers(),
                                                     "top_k": json_values}),
    "extra": json_values})
message = st.one_of(
    st.builds(lambda t, f: json.dumps({"type": t, **f}), st.sampled_from(TYPES), fields),
    json_values.map(json.dumps),
    st.text(max_size=50),
    st.binary(max_size=50),
)


def check_reply(m: dict) -> None:
    assert isinstance(m, dict) and m.get("type") in REPLY_TYPES, m
    if m["type"] == "error":
        assert isinstance(m["code"], str) and m["code"].isupper()
        assert isinstance(m["message"], str) and len(m["message"]) <= 400
        assert isinstance(m["recoverable"], bool)


@pytest.mark.slow
@pytest.mark.timeout(600)
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(message, max_size=12))
def test_any_message_sequence_gets_well_formed_replies(tmp_path_factory, messages):
    app = create_app(Settings(voices_dir=tmp_path_factory.mktemp("v"), max_session_queue=4,
                              max_text_chars=500), engine=FakeEngine(frame_s=0))
    ctx = app.state.ctx
    with TestClient(app) as client:
        with client.websocket_connect("/api/v1/speak") as ws:
            check_reply(ws.receive_json())
            for raw in messages:
                if isinstance(raw, bytes):
                    ws.send_bytes(raw)
                else:
                    ws.send_text(raw)
            ws.send_json({"type": "cancel"})
            ws.send_json({"type": "start", "format": "pcm_s16le", "sample_rate": 24000})
            while True:                                     # the session still answers
                m = ws.receive()
                assert m["type"] == "websocket.send", m
                if m.get("text") is None:
                    continue
                reply = json.loads(m["text"])
                check_reply(reply)
                if reply["type"] == "ready" and reply["format"] == "pcm_s16le" and reply["sample_rate"] == 24000 \
                        and reply["language"] == "auto":
                    break
        for _ in range(200):                                 # closed: nothing left running
            if not ctx.speech.sessions and ctx.speech.scheduler.running == 0:
                break
            time.sleep(0.05)
        assert not ctx.speech.sessions and ctx.speech.scheduler.running == 0 and ctx.speech.scheduler.waiting == 0

"""Issue 15: the server survives its clients. Real servers (tests/fakeserver.py: uvicorn, sockets,
signals) around a stand-in engine, and the app in-process where no socket is needed."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket

import httpx
import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect
from websockets.exceptions import ConnectionClosed

from makima_tts.server.app import create_app
from makima_tts.server.settings import Settings
from makima_tts.testing.rawsocket import raw_socket, read_head, ws_frame
from makima_tts.testing.server import metric, wait_for
from tests.fakeserver import FakeEngine, FakeServer
from tests.wsclient import Client


# --------------------------------------------------------------------------- helpers


def raw_websocket(port: int, query: str = "") -> socket.socket:
    """A WebSocket that reads nothing after its handshake (a tiny receive buffer)."""
    s = raw_socket(port)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(f"GET /api/v1/speak{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
              f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    assert b" 101 " in read_head(s)
    return s


def stream_count(server) -> float:
    return metric(server, "makima_active_streams")


def session_count(server) -> float:
    return metric(server, "makima_active_sessions")


# --------------------------------------------------------------------------- bug 1: sessions that never end


@pytest.mark.parametrize("last", ["cancel", "stop"])
def test_cancel_or_stop_then_close_ends_every_session_and_sigterm_completes(tmp_path, last):
    """A client that sends `cancel` (or `stop`) and closes at once: the session ends, its task with
    it, and SIGTERM then completes. (A swallowed CancelledError and a player leaving without marking
    the session idle kept 3-4 of 5 such sessions alive.)"""
    with FakeServer("--voices-dir", str(tmp_path), "--max-streams", "5", frame_s=0.2) as s:
        s.wait_ready()
        for _ in range(5):
            with Client(s.ws_url) as c:
                assert c.recv_json()["type"] == "ready"
                c.send(type="speak", text="endless speech", id="a")
                c.until("audio_start", "a")
                c.send(type=last)
        assert wait_for(lambda: session_count(s) == 0 and stream_count(s) == 0, timeout=30), \
            (session_count(s), stream_count(s))
        s.proc.send_signal(signal.SIGTERM)
        s.proc.wait(30)        # raises TimeoutExpired if the shutdown hangs


# --------------------------------------------------------------------------- bug 2 and 3: bounded text


def test_text_message_over_the_limit_is_refused_and_the_session_goes_on(tmp_path):
    app = create_app(Settings(voices_dir=tmp_path, max_text_chars=1000), engine=FakeEngine(frame_s=0))
    with TestClient(app) as client, client.websocket_connect("/api/v1/speak") as ws:
        assert ws.receive_json()["type"] == "ready"
        ws.send_json({"type": "text", "text": "a" * 400_000})
        err = ws.receive_json()
        assert err["type"] == "error" and err["code"] == "TEXT_TOO_LONG" and err["recoverable"] is True
        assert len(err["message"]) < 400
        ws.send_json({"type": "speak", "text": "Still here.", "id": "ok"})
        seen = [ws.receive_json()]
        while seen[-1].get("type") != "audio_end":
            m = ws.receive()
            if m.get("text"):
                seen.append(json.loads(m["text"]))
        assert seen[-1]["id"] == "ok"


def test_per_session_queue_is_capped_with_overloaded(tmp_path):
    """Three `text` messages of many short sentences would queue thousands of utterances: the
    session's queue stops at max_session_queue (OVERLOADED, recoverable), and the `cancelled`
    reply stays small."""
    app = create_app(Settings(voices_dir=tmp_path, max_session_queue=32, max_session_queue_chars=20000),
                     engine=FakeEngine(frame_s=0.05))
    with TestClient(app) as client, client.websocket_connect("/api/v1/speak") as ws:
        assert ws.receive_json()["type"] == "ready"
        for _ in range(3):
            ws.send_json({"type": "text", "text": "Go. " * 1200})
        for _ in range(40):
            ws.send_json({"type": "speak", "text": "Hello.", "id": "q"})
        ws.send_json({"type": "cancel"})
        errors, cancelled = [], None
        while cancelled is None:
            m = ws.receive()
            if m.get("text"):
                msg = json.loads(m["text"])
                if msg["type"] == "error":
                    errors.append(msg)
                elif msg["type"] == "cancelled":
                    cancelled = msg
        assert errors and all(e["code"] == "OVERLOADED" and e["recoverable"] for e in errors)
        assert len(cancelled["ids"]) <= 33
        ws.send_json({"type": "speak", "text": "After.", "id": "after"})
        while True:
            m = ws.receive()
            if m.get("text") and json.loads(m["text"]).get("type") == "audio_end":
                break


def test_sentence_splitting_reads_each_character_a_bounded_number_of_times(monkeypatch):
    """400,000 characters without a sentence end: the splitter reads O(n) characters, not O(n^2)."""
    from makima_tts import text as text_mod

    read = []
    original = text_mod._find_end

    def counting(buf, final, start=0, stop=None):
        read.append((len(buf) if stop is None else min(stop, len(buf))) - start)
        return original(buf, final, start, stop)

    monkeypatch.setattr(text_mod, "_find_end", counting)
    for piece in ("a" * 400_000, "word " * 80_000):
        read.clear()
        buf = text_mod.SentenceBuffer()
        sentences = buf.push(piece) + buf.flush()
        assert "".join(s.replace(" ", "") for s in sentences) == piece.replace(" ", "")
        assert sum(read) < 3 * len(piece), sum(read)


# --------------------------------------------------------------------------- bug 4 and 12


def test_deeply_nested_json_is_an_invalid_message(tmp_path):
    app = create_app(Settings(voices_dir=tmp_path), engine=FakeEngine(frame_s=0))
    with TestClient(app) as client, client.websocket_connect("/api/v1/speak") as ws:
        assert ws.receive_json()["type"] == "ready"
        ws.send_text("[" * 50_000 + "]" * 50_000)
        err = ws.receive_json()
        assert err["code"] == "INVALID_MESSAGE" and err["recoverable"] is True
        ws.send_text('{"type": "speak", "text": "x", "voice": ' + "[" * 50_000 + "]" * 50_000 + "}")
        assert ws.receive_json()["code"] == "INVALID_MESSAGE"
        ws.send_json({"type": "start"})
        assert ws.receive_json()["type"] == "ready"          # the session goes on
        r = client.post("/v1/audio/speech", content=b'{"input": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
                        headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_MESSAGE"


def test_static_path_with_a_nul_byte_is_404(tmp_path):
    app = create_app(Settings(voices_dir=tmp_path), engine=FakeEngine(frame_s=0))
    with TestClient(app) as client:
        r = client.get("/static/page.js%00.html")
        assert r.status_code == 404 and "Traceback" not in r.text
        assert client.get("/static/page.js").status_code == 200


def test_voice_clip_removed_while_downloading_is_404(tmp_path):
    from makima_tts.testing import reference_clip

    app = create_app(Settings(voices_dir=tmp_path), engine=FakeEngine(frame_s=0))
    library = app.state.ctx.library
    library.add("gone", reference_clip(3.0), 24000, transcript="Hello world.")
    original = library.audio_path

    def path_then_removed(voice_id):
        path = original(voice_id)
        library.remove(voice_id)          # removed between finding the clip and sending it
        return path

    library.audio_path = path_then_removed
    with TestClient(app) as client:
        r = client.get("/api/v1/voices/gone/audio")
        assert r.status_code == 404 and r.json()["error"]["code"] == "VOICE_NOT_FOUND"
        assert str(tmp_path) not in r.text


def test_naming_the_default_voice_makes_it(tmp_path, monkeypatch):
    """`default` named before it exists is made, as `alloy` (or no voice) makes it."""
    from makima_tts.server.context import ServerContext

    class Cloning(FakeEngine):
        supports_cloning = True

    from makima_tts.voices import ResolvedVoice

    ctx = ServerContext(Settings(voices_dir=tmp_path), engine=Cloning())
    made = []
    monkeypatch.setattr(ctx.voices, "ensure_generated_voice", lambda: made.append(1) or "prompt")
    assert ctx.voices.resolve_voice("alloy") == ResolvedVoice("default", prompt="prompt")
    assert ctx.voices.resolve_voice("default") == ResolvedVoice("default", prompt="prompt")
    assert ctx.voices.resolve_voice(None, "default") == ResolvedVoice("default", prompt="prompt")
    assert len(made) == 3


# --------------------------------------------------------------------------- per-send timeout


def test_websocket_client_that_reads_nothing_loses_its_slot(tmp_path):
    with FakeServer("--voices-dir", str(tmp_path), "--max-streams", "1", "--max-queue", "0", "--send-timeout", "1",
                    frame_s=0.001, chunk_samples=24000) as s:
        s.wait_ready()
        sock = raw_websocket(s.port)
        try:
            sock.sendall(ws_frame(json.dumps({"type": "speak", "text": "endless", "id": "hog"})))
            assert wait_for(lambda: stream_count(s) == 1, timeout=30)
            assert wait_for(lambda: stream_count(s) == 0, timeout=60)     # cancelled: the slot is free
            with Client(s.ws_url) as c:
                assert c.recv_json()["type"] == "ready"
                end, audio = c.utterance("Hello.", id="b")
                assert len(audio) == 5 * 24000 * 2
        finally:
            sock.close()


def test_http_client_that_reads_nothing_loses_its_slot(tmp_path):
    with FakeServer("--voices-dir", str(tmp_path), "--max-streams", "1", "--max-queue", "0", "--send-timeout", "1",
                    frame_s=0.001, chunk_samples=24000) as s:
        s.wait_ready()
        sock = raw_socket(s.port)
        try:
            body = json.dumps({"input": "endless", "response_format": "pcm"}).encode()
            sock.sendall(f"POST /v1/audio/speech HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            assert wait_for(lambda: stream_count(s) == 1, timeout=30)
            assert wait_for(lambda: stream_count(s) == 0, timeout=60)
            r = httpx.post(s.url + "/v1/audio/speech", json={"input": "Hello.", "response_format": "pcm"},
                           timeout=60)
            assert r.status_code == 200 and len(r.content) == 5 * 24000 * 2
        finally:
            sock.close()


# --------------------------------------------------------------------------- keys, origins, bodies


def test_api_key_is_kept_out_of_the_logs(tmp_path):
    log = tmp_path / "server.log"
    with FakeServer("--voices-dir", str(tmp_path / "v"), "--api-key", "sekrit-key-123", log_path=log,
                    log_level="info") as s:
        s.wait_ready()
        assert httpx.get(s.url + "/v1/models?api_key=sekrit-key-123").status_code == 200
        assert httpx.get(s.url + "/v1/models?x=1&api_key=sekrit-key-123").status_code == 200
        with Client(s.ws_url + "/api/v1/speak?api_key=sekrit-key-123") as c:
            assert c.recv_json()["type"] == "ready"
    text = log.read_text()
    assert "/v1/models" in text and "WebSocket" in text
    assert "sekrit-key-123" not in text and "api_key=REDACTED" in text


@pytest.mark.parametrize("keys", [[], ["k1"]])
def test_origin_is_checked_on_websocket_and_state_changing_routes(tmp_path, keys):
    app = create_app(Settings(voices_dir=tmp_path, api_keys=keys), engine=FakeEngine(frame_s=0))
    auth = {"authorization": "Bearer k1"} if keys else {}
    with TestClient(app, base_url="http://tts.example:8000") as client:
        with pytest.raises(WebSocketDisconnect) as e:
            with client.websocket_connect("/api/v1/speak", headers={"origin": "http://evil.example", **auth}):
                pass
        assert e.value.code == 4403
        for origin in ("http://tts.example:8000", "http://localhost:3000", "http://127.0.0.1:8000"):
            with client.websocket_connect("/api/v1/speak", headers={"origin": origin, "host": "tts.example:8000",
                                                                    **auth}) as ws:
                assert ws.receive_json()["type"] == "ready"
        with client.websocket_connect("/api/v1/speak", headers=auth) as ws:       # not a browser
            assert ws.receive_json()["type"] == "ready"
        # a cross-site form POST does not create a voice
        r = client.post("/api/v1/voices", files={"file": ("a.wav", b"RIFF....", "audio/wav")},
                        data={"voice_id": "x"}, headers={"origin": "http://evil.example", **auth})
        assert r.status_code == 403 and r.json()["error"]["code"] == "FORBIDDEN_ORIGIN"
        r = client.post("/v1/audio/speech", json={"input": "Hi."}, headers={"origin": "http://evil.example", **auth})
        assert r.status_code == 403
        assert client.get("/speak", headers={"origin": "http://evil.example"}).status_code == 200
    allowed = create_app(Settings(voices_dir=tmp_path, allowed_origins=["http://evil.example"]),
                         engine=FakeEngine(frame_s=0))
    with TestClient(allowed) as client:
        with client.websocket_connect("/api/v1/speak", headers={"origin": "http://evil.example"}) as ws:
            assert ws.receive_json()["type"] == "ready"


def _asgi_post(app, path: str, headers: dict, body_parts: list) -> tuple[int, dict, int]:
    """POST through the ASGI app; (status, JSON body, body parts the app asked for)."""
    asked = 0
    out: dict = {"status": 0, "body": b""}

    async def receive():
        nonlocal asked
        asked += 1
        if asked <= len(body_parts):
            return {"type": "http.request", "body": body_parts[asked - 1], "more_body": asked < len(body_parts)}
        await asyncio.sleep(3600)

    async def send(message):
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    async def go():
        async with app.router.lifespan_context(app):
            scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
                     "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
                     "query_string": b"", "root_path": "", "server": ("127.0.0.1", 8000),
                     "client": ("127.0.0.1", 1234),
                     "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}
            await asyncio.wait_for(app(scope, receive, send), 30)

    asyncio.run(go())
    return out["status"], json.loads(out["body"] or b"{}"), asked


def test_key_is_checked_before_the_body_is_read_and_json_bodies_are_capped(tmp_path):
    app = create_app(Settings(voices_dir=tmp_path, api_keys=["k1"], max_json_bytes=1000),
                     engine=FakeEngine(frame_s=0))
    big = [b'{"input": "' + b"a" * 1000] * 50
    status, body, asked = _asgi_post(app, "/v1/audio/speech",
                                     {"content-type": "application/json", "content-length": str(50 * 1011)}, big)
    assert status == 401 and asked == 0                     # refused before a byte of the body was read
    status, body, asked = _asgi_post(app, "/v1/audio/speech", {"content-type": "application/json",
                                                               "authorization": "Bearer k1"}, big)
    assert status == 413 and body["error"]["code"] == "REQUEST_TOO_LARGE" and asked <= 2
    status, body, asked = _asgi_post(app, "/v1/audio/speech", {"content-type": "application/json",
                                                               "authorization": "Bearer k1",
                                                               "content-length": "999999"}, big)
    assert status == 413 and asked == 0


def test_slow_headers_and_slow_bodies_are_cut_off(tmp_path):
    with FakeServer("--voices-dir", str(tmp_path), "--header-timeout", "1", "--body-timeout", "1") as s:
        s.wait_ready()
        with raw_socket(s.port) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")         # the headers never end
            assert sock.recv(1024) == b""                                 # closed by the server
        with raw_socket(s.port) as sock:
            sock.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"input\": ")       # the body never ends
            head = read_head(sock)
            assert b" 408 " in head.split(b"\r\n")[0]


# --------------------------------------------------------------------------- messages


def test_errors_do_not_echo_long_input_or_paths(tmp_path):
    from makima_tts.server.errors import public_message

    app = create_app(Settings(voices_dir=tmp_path), engine=FakeEngine(frame_s=0))
    with TestClient(app) as client, client.websocket_connect("/api/v1/speak") as ws:
        assert ws.receive_json()["type"] == "ready"
        ws.send_json({"type": "speak", "text": "Hi.", "voice": "v" * 200_000})
        err = ws.receive_json()
        assert err["type"] == "error" and len(json.dumps(err)) < 600
        ws.send_json({"type": "v" * 200_000})
        assert len(json.dumps(ws.receive_json())) < 600
        r = client.post("/v1/audio/speech", json={"input": "Hi.", "voice": "v" * 200_000})
        assert r.status_code in (400, 404) and len(r.text) < 600
    msg = public_message(f"reference clip {tmp_path}/x/ref.flac is missing; see POST /api/v1/voices")
    assert str(tmp_path) not in msg and "/api/v1/voices" in msg


# --------------------------------------------------------------------------- shutdown


def test_sigterm_drains_then_closes_with_1012_and_exits_despite_a_non_reader(tmp_path):
    with FakeServer("--voices-dir", str(tmp_path), "--max-streams", "3", "--drain-timeout", "2",
                    "--send-timeout", "60", frame_s=0.001, chunk_samples=24000) as s:
        s.wait_ready()
        hog = raw_websocket(s.port)
        hog.sendall(ws_frame(json.dumps({"type": "speak", "text": "endless", "id": "hog"})))
        c = Client(s.ws_url)
        assert c.recv_json()["type"] == "ready"
        c.send(type="speak", text="endless", id="e")
        c.until("audio_start", "e")
        assert wait_for(lambda: stream_count(s) == 2, timeout=30)
        s.proc.send_signal(signal.SIGTERM)
        messages = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                m = c.recv(timeout=60)
                if isinstance(m, dict):
                    messages.append(m)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
        errors = [m for m in messages if m["type"] == "error"]
        assert errors and errors[-1]["code"] == "SERVER_SHUTDOWN" and errors[-1]["recoverable"] is True
        assert s.proc.wait(30) is not None            # the process ends though `hog` reads nothing
        hog.close()


def test_sigterm_lets_a_running_utterance_finish(tmp_path):
    with FakeServer("--voices-dir", str(tmp_path), "--drain-timeout", "30", frame_s=0.3) as s:
        s.wait_ready()
        with Client(s.ws_url) as c:
            assert c.recv_json()["type"] == "ready"
            c.send(type="speak", text="Five chunks.", id="a")
            c.until("audio_start", "a")
            s.proc.send_signal(signal.SIGTERM)
            seen, audio = c.until_one_of(("audio_end", "error"), "a")
            assert seen[-1]["type"] == "audio_end" and len(audio) == 5 * 2400 * 2
            assert c.recv_json()["code"] == "SERVER_SHUTDOWN"
        assert s.proc.wait(30) is not None

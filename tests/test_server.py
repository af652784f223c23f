"""The server over real sockets: `makima-tts serve` in a child process with the tiny checkpoint,
driven by `websockets`, the `openai` SDK and httpx."""
from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed

from makima_tts.engine.types import LANGUAGES
from makima_tts.testing.server import ServerProcess, metric, wait_for
from tests.servers import serving, voices_folder
from tests.wsclient import Client

openai = pytest.importorskip("openai")
av = pytest.importorskip("av")

LONG = "Hello world, this sentence goes on. " * 12     # the tiny model speaks it for many seconds
MAX_TEXT = 800


@pytest.fixture(scope="module")
def voices_dir(tmp_path_factory, ref_clip):
    return voices_folder(tmp_path_factory, ref_clip)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, voices_dir, tmp_path_factory):
    with serving(tmp_path_factory, "--checkpoint", str(tiny_checkpoint), "--voices-dir", str(voices_dir),
                 "--max-streams", "2", "--max-queue", "8", "--max-text-chars", str(MAX_TEXT),
                 "--default-voice", "tester") as s:
        yield s


@pytest.fixture(scope="module")
def busy_server(tiny_checkpoint, voices_dir):
    """One generation slot, no waiting queue."""
    with ServerProcess("--checkpoint", str(tiny_checkpoint), "--voices-dir", str(voices_dir),
                       "--max-streams", "1", "--max-queue", "0") as s:
        s.wait_ready()
        yield s


@pytest.fixture
def client(server):
    with Client(server.ws_url) as c:
        assert c.recv_json()["type"] == "ready"
        yield c


def sdk(server, **kw):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


def decode(data: bytes) -> tuple[np.ndarray, int]:
    with av.open(io.BytesIO(data)) as f:
        stream = f.streams.audio[0]
        pcm = np.concatenate([fr.to_ndarray().reshape(-1) for fr in f.decode(stream)])
        return pcm, stream.rate


# --------------------------------------------------------------------------- WebSocket


def test_ready_then_frames_of_pcm(server):
    with Client(server.ws_url) as c:
        ready = c.recv_json()
        assert ready["type"] == "ready" and ready["engine"] == "qwen3"
        assert ready["sample_rate"] == 24000 and ready["format"] == "pcm_s16le" and ready["channels"] == 1
        assert ready["voice"] == "tester" and ready["session_id"]
        # what the session accepts (the /speak page takes its pickers and limits from these)
        assert ready["languages"] == list(LANGUAGES) and ready["languages"][0] == "auto"
        assert ready["sample_rates"] == [8000, 16000, 22050, 24000, 44100, 48000]
        assert ready["max_text_chars"] == MAX_TEXT
        end, audio = c.utterance("Hello world.", id="a")
        kinds = ["bin" if isinstance(m, bytes) else m["type"] for m in c.log]
        assert kinds[1] == "audio_start" and kinds[-1] == "audio_end"
        assert kinds.count("bin") > 2                  # streamed in several frames, not one blob
        pcm = np.frombuffer(audio, "<i2")
        assert len(pcm) > 24000 // 2
        assert end["id"] == "a" and abs(len(pcm) / 24 - end["audio_ms"]) < 1.0
        assert end["ttfa_ms"] > 0 and end["rtf"] > 0


def test_start_sets_format_and_rate(client):
    client.send(type="start", format="pcm_f32le", sample_rate=16000, voice="tester", language="english")
    ready = client.recv_json()
    assert ready["type"] == "ready" and ready["format"] == "pcm_f32le" and ready["sample_rate"] == 16000
    end, audio = client.utterance("Hello world.")
    pcm = np.frombuffer(audio, "<f4")
    assert abs(len(pcm) / 16 - end["audio_ms"]) < 1.0 and np.all(np.abs(pcm) <= 1.0)


def test_utterances_play_in_order(client):
    client.send(type="speak", text="First one.", id="one")
    client.send(type="speak", text="Second one.", id="two")
    seen, _ = client.until("audio_end", "two")
    order = [(m["type"], m.get("id")) for m in seen]
    assert order == [("audio_start", "one"), ("audio_end", "one"), ("audio_start", "two"), ("audio_end", "two")]


def test_interrupt_cancels_current_and_queue(client):
    client.send(type="speak", text=LONG, id="long")
    client.send(type="speak", text="Queued.", id="queued")
    client.until("audio_start", "long")
    client.recv()                                         # some audio of "long"
    client.send(type="speak", text="Now this.", id="now", interrupt=True)
    seen, _ = client.until("audio_end", "now")
    cancelled = [m for m in seen if m["type"] == "cancelled"]
    assert cancelled and cancelled[0]["ids"] == ["long", "queued"]
    ids_after = [m.get("id") for m in seen[seen.index(cancelled[0]):] if m["type"] != "cancelled"]
    assert set(ids_after) == {"now"}


def test_cancel_stops_before_next_frame(client):
    client.send(type="speak", text=LONG, id="long")
    client.until("audio_start", "long")
    client.send(type="cancel")
    seen, _ = client.until("cancelled")
    assert seen[-1]["ids"] == ["long"] and not any(m["type"] == "audio_end" for m in seen)
    # nothing of "long" after `cancelled`: the next message is the next utterance's start
    client.send(type="speak", text="After.", id="after")
    assert client.recv() == {"type": "audio_start", "id": "after", "voice": "tester"}
    client.until("audio_end", "after")


def test_streamed_text_speaks_each_sentence_when_complete(client):
    client.send(type="start", text_mode="sentence")
    assert client.recv_json()["text_mode"] == "sentence"
    client.send(type="text", text="The first sentence is here. The sec")
    first = client.recv_json()                               # spoken before any flush
    assert first["type"] == "audio_start"
    client.send(type="text", text="ond one, Dr. Smith said, costs 3.5 dollars")
    client.send(type="flush")
    seen, _ = client.until("audio_end", timeout=120)
    seen2, _ = client.until("audio_end", timeout=120)
    second_start = [m for m in seen + seen2 if m["type"] == "audio_start"]
    assert len(second_start) == 1 and second_start[0]["id"] != first["id"]
    ends = [m for m in seen + seen2 if m["type"] == "audio_end"]
    assert [e["id"] for e in ends] == [first["id"], second_start[0]["id"]]


GREEDY = {"do_sample": False, "seed": 1, "predictor": {"do_sample": False}}


def test_streamed_text_is_fed_token_by_token_by_default(client):
    """Token mode (the default on Qwen3): one utterance per flush, speaking before any sentence ends, with the
    audio of the whole text spoken at once."""
    client.send(type="start", sampling=GREEDY)
    assert client.recv_json()["text_mode"] == "token"
    pieces = ["so this reply ", "has no punctuation ", "and keeps ", "going on for ", "a while longer "]
    client.send(type="text", text=pieces[0])
    client.send(type="text", text=pieces[1])
    first = client.recv_json()                              # before any flush or sentence end
    assert first["type"] == "audio_start" and first["tokens_needed"] >= 1
    for p in pieces[2:]:
        client.send(type="text", text=p)
    client.send(type="flush")
    seen, streamed = client.until("audio_end", timeout=120)
    assert not [m for m in seen if m["type"] == "audio_start"]      # one utterance for all the pieces
    client.send(type="speak", text="".join(pieces), id="whole")
    _, whole = client.until("audio_end", id="whole", timeout=120)
    assert len(streamed) > 0 and streamed == whole


def test_stop_finishes_queue_then_closes(server):
    with Client(server.ws_url) as c:
        c.recv_json()
        c.send(type="speak", text="One.", id="a")
        c.send(type="speak", text="Two.", id="b")
        c.send(type="stop")
        seen, _ = c.until("stopped")
        assert [(m["type"], m.get("id")) for m in seen if m["type"] == "audio_end"] == [("audio_end", "a"),
                                                                                      ("audio_end", "b")]
        with pytest.raises(ConnectionClosed):
            c.recv(timeout=10)
        assert c.ws.close_code == 1000


@pytest.mark.parametrize("message,code", [
    ("not json", "INVALID_MESSAGE"),
    ({"type": "sing"}, "INVALID_MESSAGE"),
    ({"type": "speak"}, "INVALID_MESSAGE"),
    ({"type": "speak", "text": "hi", "colour": "red"}, "INVALID_MESSAGE"),
    ({"type": "speak", "text": "   "}, "EMPTY_TEXT"),
    ({"type": "speak", "text": "a" * (MAX_TEXT + 1)}, "TEXT_TOO_LONG"),
    ({"type": "start", "format": "mp3"}, "UNSUPPORTED_FORMAT"),
    ({"type": "start", "sample_rate": 12345}, "UNSUPPORTED_FORMAT"),
    ({"type": "speak", "text": "hi", "language": "klingon"}, "UNSUPPORTED_LANGUAGE"),
    ({"type": "speak", "text": "hi", "voice": "nobody"}, "VOICE_NOT_FOUND"),
    (b"\x00\x01", "INVALID_MESSAGE"),
])
def test_bad_messages_get_recoverable_errors(client, message, code):
    if isinstance(message, bytes):
        client.ws.send(message)
    else:
        client.ws.send(message if isinstance(message, str) else json.dumps(message))
    err = client.recv_json()
    assert err["type"] == "error" and err["code"] == code and err["recoverable"] is True and err["message"]
    end, audio = client.utterance("Still here.", id="ok")    # the session goes on
    assert len(audio) > 0


# --------------------------------------------------------------------------- OpenAI-compatible HTTP


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
def test_openai_sdk_every_format(server, fmt):
    with sdk(server).audio.speech.with_streaming_response.create(
            model="tts-1", voice="tester", input="Hello world.", response_format=fmt) as r:
        assert r.status_code == 200
        data = r.read()
    if fmt == "pcm":
        pcm, rate = np.frombuffer(data, "<i2").astype(np.float32) / 32768, 24000
    else:
        pcm, rate = decode(data)
        assert rate == (48000 if fmt == "opus" else 24000)
    assert len(pcm) / rate > 0.5 and np.abs(pcm).max() > 0.01


def test_openai_alias_voice_means_default(server):
    data = sdk(server).audio.speech.create(model="tts-1", voice="alloy", input="Hello.", response_format="wav").read()
    pcm, rate = decode(data)
    assert rate == 24000 and len(pcm) > 0


def test_body_streams_before_generation_ends(server):
    """The first bytes arrive while the utterance is still generating (metrics show it active)."""
    with httpx.stream("POST", server.url + "/v1/audio/speech",
                      json={"input": LONG, "voice": "tester", "response_format": "pcm", "seed": 1}, timeout=60) as r:
        chunks = r.iter_bytes()        # keep it: a dropped iterator closes the response
        first = next(chunks)
        assert len(first) > 0 and metric(server, "makima_active_streams") >= 1
    # the client went away mid-stream: its slot is freed
    assert wait_for(lambda: metric(server, "makima_active_streams") == 0)


def test_speed_keeps_pitch_and_changes_duration(server):
    def run(speed):
        data = sdk(server).audio.speech.create(model="tts-1", voice="tester", input="Hello world.",
                                               response_format="pcm", speed=speed, extra_body={"seed": 7}).read()
        return np.frombuffer(data, "<i2")

    normal, fast, slow = run(1.0), run(2.0), run(0.5)
    assert abs(len(fast) / len(normal) - 0.5) < 0.05
    assert abs(len(slow) / len(normal) - 2.0) < 0.1


def test_sse_stream_format(server):
    with httpx.stream("POST", server.url + "/v1/audio/speech", timeout=60,
                      json={"input": "Hello world.", "voice": "tester", "response_format": "pcm",
                            "stream_format": "sse"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert deltas and events[-1]["type"] == "speech.audio.done"
    audio = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    assert len(audio) > 24000 and len(audio) % 2 == 0


@pytest.mark.parametrize("kwargs,exc,code", [
    ({"input": "", "voice": "tester"}, "BadRequestError", "EMPTY_TEXT"),
    ({"input": "a" * (MAX_TEXT + 1), "voice": "tester"}, "APIStatusError", "TEXT_TOO_LONG"),
    ({"input": "Hi.", "voice": "nobody"}, "NotFoundError", "VOICE_NOT_FOUND"),
    ({"input": "Hi.", "voice": "tester", "response_format": "ogg"}, "BadRequestError", "INVALID_MESSAGE"),
    ({"input": "Hi.", "voice": "tester", "speed": 9}, "BadRequestError", "INVALID_MESSAGE"),
    ({"input": "Hi.", "voice": "tester", "extra_body": {"language": "klingon"}}, "BadRequestError",
     "UNSUPPORTED_LANGUAGE"),
])
def test_openai_errors_in_openai_shape(server, kwargs, exc, code):
    with pytest.raises(getattr(openai, exc)) as info:
        sdk(server).audio.speech.create(model="tts-1", **kwargs)
    assert info.value.code == code and info.value.message
    assert info.value.body["type"]                 # {"error": {"message", "type", "param", "code"}}


# --------------------------------------------------------------------------- operations


def test_health_ready_metrics_docs(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/ready").json()
    assert ready["ready"] is True and ready["engine"] == "qwen3" and "tiny" in ready["model"]
    assert ready["default_voice"]["voice_id"] == "tester"
    with Client(server.ws_url) as c:
        c.recv_json()
        assert metric(server, "makima_active_sessions") >= 1
        c.utterance("Counted.")
    assert metric(server, "makima_utterances_total", '{engine="qwen3",outcome="ok"}') >= 1
    assert metric(server, "makima_time_to_first_audio_seconds_count") >= 1
    assert metric(server, "makima_real_time_factor_count") >= 1
    text = httpx.get(server.url + "/metrics").text
    assert "makima_queued_requests" in text and "makima_errors_total" in text
    assert "/v1/audio/speech" in httpx.get(server.url + "/openapi.json").json()["paths"]


def test_overloaded_when_slots_and_queue_are_full(busy_server):
    with httpx.stream("POST", busy_server.url + "/v1/audio/speech", timeout=60,
                      json={"input": LONG, "voice": "tester", "response_format": "pcm", "seed": 1}) as r:
        chunks = r.iter_bytes()
        next(chunks)
        with pytest.raises(openai.RateLimitError) as info:
            sdk(busy_server).audio.speech.create(model="tts-1", voice="tester", input="Hi.")
        assert info.value.code == "OVERLOADED"
        with Client(busy_server.ws_url) as c:
            c.recv_json()
            c.send(type="speak", text="Hi.", id="x")
            err = c.recv_json()
            assert err["code"] == "OVERLOADED" and err["recoverable"] is True and err["id"] == "x"
    assert wait_for(lambda: metric(busy_server, "makima_active_streams") == 0)
    assert sdk(busy_server).audio.speech.create(model="tts-1", voice="tester", input="Hi.",
                                                response_format="pcm").read()


def test_vanished_websocket_client_frees_its_slot(busy_server):
    c = Client(busy_server.ws_url)
    c.recv_json()
    c.send(type="speak", text=LONG, id="long")
    c.until("audio_start")
    assert isinstance(c.recv(), bytes)
    c.ws.socket.close()                               # vanish without a close handshake
    assert wait_for(lambda: metric(busy_server, "makima_active_streams") == 0)
    assert wait_for(lambda: metric(busy_server, "makima_active_sessions") == 0)
    assert sdk(busy_server).audio.speech.create(model="tts-1", voice="tester", input="Hi.",
                                                response_format="pcm").read()


def test_api_keys_and_idle_timeout(tiny_checkpoint, voices_dir):
    with ServerProcess("--checkpoint", str(tiny_checkpoint), "--voices-dir", str(voices_dir),
                       "--api-key", "k1", "--api-key", "k2", "--session-idle-timeout", "1") as s:
        s.wait_ready()
        assert httpx.get(s.url + "/health").status_code == 200
        r = httpx.post(s.url + "/v1/audio/speech", json={"input": "Hi.", "voice": "tester"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "UNAUTHORIZED"
        with pytest.raises(openai.AuthenticationError):
            sdk(s, api_key="wrong").audio.speech.create(model="tts-1", voice="tester", input="Hi.")
        with Client(s.ws_url) as c:
            with pytest.raises(ConnectionClosed):
                c.recv(timeout=10)
            assert c.ws.close_code == 4401
        with Client(s.ws_url + "/api/v1/speak?api_key=k1") as c:
            c.send(type="speak", text="Hi.", id="nope")     # not processed: wrong key above; this one is right
            assert c.recv_json()["type"] == "ready"
            c.until("audio_end")
            err = c.recv_json(timeout=10)                  # idle for 1 s
            assert err["code"] == "SESSION_TIMEOUT" and err["recoverable"] is False
            with pytest.raises(ConnectionClosed):
                c.recv(timeout=10)
            assert c.ws.close_code == 4408
        assert sdk(s, api_key="k2").audio.speech.create(model="tts-1", voice="tester", input="Hi.",
                                                        response_format="pcm").read()
        # the refused requests did no work: only the two authorised utterances were spoken
        assert metric(s, "makima_utterances_total", '{engine="qwen3",outcome="ok"}') == 2


def test_more_sessions_than_streams_all_complete(server):
    """max_streams is 2: six sessions at once wait their turn and all finish."""
    import threading

    done, errors = [], []

    def one(i):
        try:
            with Client(server.ws_url) as c:
                c.recv_json()
                end, audio = c.utterance(f"Session {i}.", id=f"s{i}")
                done.append((end["id"], len(audio)))
        except Exception as e:        # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and sorted(i for i, _ in done) == [f"s{i}" for i in range(6)]
    assert all(n > 0 for _, n in done)


def test_batched_server_serves_concurrent_sessions(tiny_checkpoint, voices_dir):
    """--batch: one scheduler steps the streams together; every session gets its whole utterance,
    and a seeded utterance is the same alone and among others: the same frames (tests/test_batch.py
    checks the codes exactly), so the same audio to the codec's rounding. The codec decodes a batch's
    rows and frames in one call whose shape (rows, frames per call) changes its kernels' rounding; the
    random test decoder turns some of those roundings into flipped, clipped samples (about 1 %), where
    a different frame would change most of them."""
    import numpy as np

    import threading

    with ServerProcess("--checkpoint", str(tiny_checkpoint), "--voices-dir", str(voices_dir), "--batch",
                       "--max-streams", "4", "--default-voice", "tester") as s:
        assert s.wait_ready()["batched"] is True

        def speak(text, out):
            with Client(s.ws_url) as c:
                c.recv_json()
                c.send(type="start", sampling={"seed": 5})
                c.recv_json()
                out.append(c.utterance(text)[1])

        alone: list = []
        speak("Hello world.", alone)
        together: list = [[] for _ in range(4)]
        threads = [threading.Thread(target=speak, args=(t, together[i]))
                   for i, t in enumerate(["Hello world.", "Another text here.", "A third one.", "Four."])]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert all(len(o) == 1 and len(o[0]) > 0 for o in together)
        a, b = np.frombuffer(alone[0], np.int16), np.frombuffer(together[0][0], np.int16)
        assert a.shape == b.shape and float(np.mean(a == b)) > 0.95

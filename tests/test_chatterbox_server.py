"""`makima-tts serve` with the Chatterbox engine (a tiny random-weight export in the official ONNX layout),
over real sockets: /ready, the WebSocket protocol, the OpenAI endpoint, the voice library."""
from __future__ import annotations

import io

import httpx
import numpy as np
import pytest

from makima_tts.audio import wav_bytes
from makima_tts.testing.server import ServerProcess, free_port, metric
from tests.servers import serving, voices_folder
from tests.test_server import sdk
from tests.wsclient import Client

openai = pytest.importorskip("openai")
av = pytest.importorskip("av")


@pytest.fixture(scope="module")
def cb_voices(tmp_path_factory, ref_clip):
    return voices_folder(tmp_path_factory, ref_clip, "cb-voices")


@pytest.fixture(scope="module")
def cb_server(chatterbox_export, cb_voices, tmp_path_factory):
    """engine auto: the checkpoint folder's layout picks Chatterbox."""
    port = free_port()
    with serving(tmp_path_factory, "--checkpoint", str(chatterbox_export), "--onnx-dtype", "fp32", "--voices-dir",
                 str(cb_voices), "--default-voice", "tester", "--max-streams", "2",
                 "--wyoming-port", str(port)) as s:
        s.wyoming_port = port
        yield s


def test_auto_picks_chatterbox_and_ready_names_it(cb_server):
    ready = httpx.get(cb_server.url + "/ready").json()
    assert ready["engine"] == "chatterbox" and ready["cloning"] is True and ready["batched"] is False
    assert ready["sample_rate"] == 24000 and "Chatterbox" in ready["reason"]
    models = httpx.get(cb_server.url + "/v1/models").json()["data"]
    assert models[-1]["owned_by"] == "chatterbox"


def test_websocket_streams_a_cloned_voice(cb_server):
    with Client(cb_server.ws_url) as c:
        ready = c.recv_json()
        assert ready["type"] == "ready" and ready["engine"] == "chatterbox" and ready["voice"] == "tester"
        assert ready["languages"] == ["auto", "english"]          # what the /speak page offers
        # greedy: random weights sampled may draw the stop token after a few tokens (one CI run did: 2 chunks);
        # greedy runs to the length limit, long enough for several chunks
        c.send(type="start", sampling={"do_sample": False})
        assert c.recv_json()["type"] == "ready"
        end, audio = c.utterance("Hello world, this is Chatterbox.", id="a")
        kinds = ["bin" if isinstance(m, bytes) else m["type"] for m in c.log]
        assert kinds.count("bin") > 2                      # streamed in several pieces
        pcm = np.frombuffer(audio, "<i2")
        assert len(pcm) > 24000 // 2 and abs(len(pcm) / 24 - end["audio_ms"]) < 1.0
        assert end["ttfa_ms"] > 0


def test_other_languages_are_a_recoverable_error(cb_server):
    with Client(cb_server.ws_url) as c:
        c.recv_json()
        c.send(type="speak", text="Hallo Welt.", language="german", id="de")
        err = c.recv_json()
        assert err["type"] == "error" and err["code"] == "UNSUPPORTED_LANGUAGE" and err["recoverable"] is True
        assert "English only" in err["message"]
        _, audio = c.utterance("Hello again.", id="en", language="english")     # the session goes on
        assert len(audio) > 0
    with pytest.raises(openai.BadRequestError) as info:
        sdk(cb_server).audio.speech.create(model="tts-1", voice="tester", input="Bonjour.",
                                           extra_body={"language": "french"})
    assert info.value.code == "UNSUPPORTED_LANGUAGE"


def test_openai_endpoint_speaks(cb_server):
    data = sdk(cb_server).audio.speech.create(model="tts-1", voice="tester", input="Hello there.",
                                              response_format="wav", extra_body={"seed": 2}).read()
    with av.open(io.BytesIO(data)) as f:
        stream = f.streams.audio[0]
        pcm = np.concatenate([fr.to_ndarray().reshape(-1) for fr in f.decode(stream)])
        assert stream.rate == 24000 and len(pcm) > 12000


def test_wyoming_speaks_with_the_library_voice(cb_server):
    import asyncio

    from wyoming.audio import AudioStart
    from wyoming.client import AsyncTcpClient
    from wyoming.info import Describe, Info
    from wyoming.tts import Synthesize, SynthesizeVoice

    from tests.test_wyoming import kinds, read_until

    async def go():
        async with AsyncTcpClient("127.0.0.1", cb_server.wyoming_port) as c:
            await c.write_event(Describe().event())
            info = Info.from_event((await read_until(c, "info"))[-1])
            await c.write_event(Synthesize(text="Hello there.", voice=SynthesizeVoice(name="tester")).event())
            return info, await read_until(c, "audio-stop", "error")

    info, events = asyncio.run(asyncio.wait_for(go(), 240))
    assert {v.name: v.languages for v in info.tts[0].voices}["tester"] == ["en"]
    assert kinds(events) == ["audio-start", "chunks", "audio-stop"], kinds(events)
    assert AudioStart.from_event(events[0]).rate == 24000


def test_voice_uploaded_for_chatterbox_is_prepared_once_and_x_vector_only_refused(cb_server, ref_clip):
    before = metric(cb_server, "makima_voice_prompt_computations_total") or 0
    r = httpx.post(cb_server.url + "/api/v1/voices", timeout=120,
                   files={"file": ("bea.wav", wav_bytes(ref_clip, 24000), "audio/wav")}, data={"name": "Bea"})
    assert r.status_code == 201, r.text
    vid = r.json()["voice_id"]
    assert r.json()["engines"] == ["chatterbox"]                 # the listing says which engine it is prepared for
    listed = {v["voice_id"]: v for v in httpx.get(cb_server.url + "/api/v1/voices").json()["voices"]}
    assert listed[vid]["engines"] == ["chatterbox"]
    for _ in range(2):
        with Client(cb_server.ws_url) as c:
            c.recv_json()
            _, audio = c.utterance("Hello.", voice=vid)
            assert len(audio) > 0
    assert metric(cb_server, "makima_voice_prompt_computations_total") == before + 1
    r = httpx.post(cb_server.url + "/api/v1/voices", timeout=120,
                   files={"file": ("xv.wav", wav_bytes(ref_clip, 24000), "audio/wav")},
                   data={"voice_id": "xv", "name": "XV", "x_vector_only": "true"})
    assert r.status_code >= 400 and "x-vector-only" in r.json()["error"]["message"]
    assert httpx.get(cb_server.url + "/api/v1/voices/xv").status_code == 404


def test_engine_chatterbox_needs_its_export(chatterbox_export, tiny_checkpoint, tmp_path):
    with ServerProcess("--engine", "chatterbox", "--checkpoint", str(chatterbox_export), "--voices-dir",
                       str(tmp_path / "v")) as s:
        assert s.wait_ready()["engine"] == "chatterbox"
    # a Qwen3 checkpoint is not a Chatterbox export: the start fails, saying why
    with ServerProcess("--engine", "chatterbox", "--checkpoint", str(tiny_checkpoint), "--voices-dir",
                       str(tmp_path / "v"), log_path=tmp_path / "log") as s:
        s.proc.wait(120)
        assert s.proc.returncode != 0 and "not a Chatterbox-Turbo ONNX export" in s.log()
    # and auto with a Qwen3 checkpoint still serves Qwen3
    with ServerProcess("--checkpoint", str(tiny_checkpoint), "--voices-dir", str(tmp_path / "v"),
                       "--default-voice", "tester") as s:
        assert s.wait_ready()["engine"] == "qwen3"
